"""GGUF (llama.cpp) import: metadata → ModelConfig, tensors → float32 in HF layout, vocabulary →
a `tokenizers` tokenizer.json.

Two llama.cpp conventions are undone here:
- GGUF stores dims innermost-first; the `gguf` reader already gives numpy (row-major) shapes.
- For the "llama" architecture, llama.cpp permutes the rows of Q and K so RoPE rotates adjacent
  pairs (x[2i], x[2i+1]); HF checkpoints (and models/decoder.py) rotate halves (x[i], x[i+E/2]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader
from gguf import quants as gguf_quants
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers

from meshserve.models import generation
from meshserve.models.config import ModelConfig
from meshserve.models.convert import TensorSource
from meshserve.models.errors import ConfigError, ConvertError
from meshserve.models.tokenizer import Tokenizer, TokenizerConfig

# Every type the gguf package dequantizes: the float ones, the legacy and K-quants, the IQ and ternary
# formats (weights are dequantized at conversion).
SUPPORTED_TYPES = (Q.F32, Q.F16, *gguf_quants._type_traits)
# GGUF's architecture names and ours; Mixtral is "llama" with experts.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                           "qwen3moe": "qwen3_moe"}

_GLOBAL = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
_LAYER = {
    "input_norm": "attn_norm.weight", "post_attn_norm": "ffn_norm.weight",
    "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight", "o": "attn_output.weight",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    # experts stacked in one tensor each, numpy shapes [X, F, D] / [X, D, F] as HF's
    "router": "ffn_gate_inp.weight", "experts_gate": "ffn_gate_exps.weight",
    "experts_up": "ffn_up_exps.weight", "experts_down": "ffn_down_exps.weight",
    "shared_gate": "ffn_gate_shexp.weight", "shared_up": "ffn_up_shexp.weight",
    "shared_down": "ffn_down_shexp.weight", "shared_expert_gate": "ffn_gate_inp_shexp.weight",
}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as in the models' own tokenizer.json files.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class GGUFSource(TensorSource):
    def __init__(self, path: Path):
        if not path.is_file():
            raise ConvertError(f"GGUF file {path} does not exist")
        try:
            self._reader = GGUFReader(path, "r")
        except Exception as e:  # the reader raises ValueError, KeyError, IndexError… on bad files
            raise ConvertError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
        self._path = path
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensors()
        self.config = self._read_config()
        self.tokenizer = self._read_tokenizer()
        self.generation = generation.from_gguf({k: self._field(k) for k in generation.GGUF_KEYS},
                                               self._field("general.basename"), path.name)

    # ---- metadata ----------------------------------------------------------------------------

    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _check_tensors(self) -> None:
        size = self._path.stat().st_size
        for t in self._tensors.values():
            if t.data_offset + int(t.n_bytes) > size:
                raise ConvertError(
                    f"{self._path} is truncated: tensor {t.name} ends at byte "
                    f"{t.data_offset + int(t.n_bytes)} but the file has {size}")
            if t.tensor_type not in SUPPORTED_TYPES:
                names = ", ".join(q.name for q in SUPPORTED_TYPES)
                raise ConvertError(
                    f"tensor {t.name} has unsupported type {t.tensor_type.name}; supported: {names}")

    def _read_config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConvertError(f"unsupported architecture {arch!r} in {self._path.name}; "
                               f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if "blk.0.ffn_gate.0.weight" in self._tensors:
            raise ConvertError(f"{self._path.name} stores one tensor per expert (an old llama.cpp layout); "
                               "convert it again with a current llama.cpp, which stacks them (ffn_*_exps)")
        scaling_type = self._field(f"{arch}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            raise ConvertError(f"unsupported RoPE scaling {scaling_type!r} in {self._path.name}")

        def get(key, default=None):
            value = self._field(f"{arch}.{key}", default)
            if value is None:
                raise ConvertError(f"{self._path.name} lacks metadata {arch}.{key}")
            return value

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        experts = int(self._field(f"{arch}.expert_count") or 0)
        ours = "mixtral" if arch == "llama" and experts else SUPPORTED_ARCHITECTURES[arch]
        moe = {}
        if experts:
            moe = dict(num_experts=experts, num_experts_per_tok=int(get("expert_used_count")),
                       # llama.cpp: Mixtral's and Qwen3-MoE's picked weights are renormalised, Qwen2-MoE's not
                       norm_topk_prob=ours != "qwen2_moe",
                       moe_intermediate_size=int(get("expert_feed_forward_length") if ours != "mixtral"
                                                 else get("feed_forward_length")),
                       shared_expert_intermediate_size=int(
                           self._field(f"{arch}.expert_shared_feed_forward_length") or 0),
                       dense_layers=tuple(i for i in range(int(get("block_count")))
                                          if f"blk.{i}.ffn_gate_inp.weight" not in self._tensors))
        tokens = self._field("tokenizer.ggml.tokens") or []
        eos = [self._field(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                        "tokenizer.ggml.eom_token_id")]
        try:
            return ModelConfig(
                name=str(self._field("general.name") or self._path.stem),
                architecture=ours,
                vocab_size=int(get("vocab_size", len(tokens) or None)),
                hidden_size=hidden,
                # an MoE model without dense layers may omit the dense width
                intermediate_size=int(get("feed_forward_length", moe.get("moe_intermediate_size"))),
                num_layers=int(get("block_count")),
                num_heads=heads,
                num_kv_heads=int(get("attention.head_count_kv", heads)),
                head_dim=int(get("attention.key_length", hidden // heads)),
                max_position_embeddings=int(get("context_length")),
                rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                rope_theta=float(get("rope.freq_base", 10000.0)),
                attention_bias="blk.0.attn_q.bias" in self._tensors,
                qk_norm="blk.0.attn_q_norm.weight" in self._tensors,
                tie_word_embeddings="output.weight" not in self._tensors,
                sliding_window=self._field(f"{arch}.attention.sliding_window"),
                bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
                eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
                rope_freq_factors=self._rope_freq_factors(),
                **moe,
            )
        except ConfigError as e:
            raise ConvertError(f"{self._path.name}: {e}") from None

    def _rope_freq_factors(self) -> tuple[float, ...] | None:
        """Llama 3.1/3.2's RoPE scaling as llama.cpp stores it: a divisor per frequency."""
        tensor = self._tensors.get("rope_freqs.weight")
        if tensor is None:
            return None
        factors = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(-1)
        return tuple(float(f) for f in factors)

    # ---- tensors -----------------------------------------------------------------------------

    def _name(self, role: str, layer: int | None) -> str:
        return _GLOBAL[role] if layer is None else f"blk.{layer}.{_LAYER[role]}"

    def has(self, role, layer=None):
        return self._name(role, layer) in self._tensors

    def tensor_name(self, role, layer=None):
        return self._name(role, layer)

    def get(self, role, layer=None):
        name = self._name(role, layer)
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ConvertError(f"{self._path.name} has no tensor {name}")
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if role == "shared_expert_gate":  # [D] in GGUF, HF's [1, D]
            w = w.reshape(1, -1)
        if self.config.architecture in ("llama", "mixtral") and role in ("q", "k", "q_bias", "k_bias"):
            heads = self.config.num_heads if role.startswith("q") else self.config.num_kv_heads
            w = unpermute_rope_rows(w, heads)
        return w

    def get_blocks(self, role, layer=None, fmt=None):
        """The tensor as stored, when its GGML type is `fmt` of models/quant.py (Q8_0 → "q8_0", Q4_0 →
        "int4-g32", Q4_1 and Q4_K → "q4_1", Q6_K → "int8-g16"), else None: {"q", "scale"[, "zero"]} in
        HF layout, [out, in] (4-bit values two to a byte: [out, in / 2]) and scales [out, in / group],
        rows un-permuted as `get`'s. Q4_K's super-blocks of 256 are 8 groups of 32 with 6-bit scales
        and minimums under two fp16 factors: each group's scale d·sc and offset −dmin·m are exact in
        float32, and its values are repacked into Q4_1's nibble order (the same values, so dequantized
        they are gguf's). Q6_K's 6-bit values, less 32, are int8 with a scale d·sc per 16."""
        tensor = self._tensors.get(self._name(role, layer))
        if tensor is None or _KEPT.get(tensor.tensor_type) != fmt or len(tensor.shape) != 2:
            return None
        blocks = np.asarray(tensor.data).reshape(-1, tensor.data.shape[-1])  # [out, in / 32 × block bytes]
        out_features = blocks.shape[0]
        half = lambda a: a.view(np.float16).astype(np.float32)[..., 0]
        if tensor.tensor_type == Q.Q4_K:
            parts = _q4_k_as_q4_1(blocks.reshape(out_features, -1, 144))
        elif tensor.tensor_type == Q.Q6_K:
            parts = _q6_k_as_int8(blocks.reshape(out_features, -1, 210))
        else:
            blocks = blocks.reshape(out_features, -1, _BLOCK_BYTES[fmt])  # [out, in / 32, block bytes]
            if fmt == "q8_0":
                parts = {"q": blocks[..., 2:].view(np.int8).reshape(out_features, -1),
                         "scale": half(blocks[..., :2])}
            elif fmt == "int4-g32":
                parts = {"q": blocks[..., 2:].reshape(out_features, -1), "scale": half(blocks[..., :2])}
            else:
                parts = {"q": blocks[..., 4:].reshape(out_features, -1), "scale": half(blocks[..., :2]),
                         "zero": half(blocks[..., 2:4])}
        if self.config.architecture in ("llama", "mixtral") and role in ("q", "k"):
            heads = self.config.num_heads if role == "q" else self.config.num_kv_heads
            parts = {k: unpermute_rope_rows(v, heads) for k, v in parts.items()}
        return {k: np.ascontiguousarray(v) for k, v in parts.items()}

    # ---- tokenizer ---------------------------------------------------------------------------

    def _read_tokenizer(self) -> Tokenizer:
        kind = self._field("tokenizer.ggml.model")
        tokens = self._field("tokenizer.ggml.tokens")
        if not tokens:
            raise ConvertError(f"{self._path.name} carries no vocabulary (tokenizer.ggml.tokens)")
        types = self._field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, self._field("tokenizer.ggml.merges") or [],
                                      self._field("tokenizer.ggml.pre") or "default")
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, self._field("tokenizer.ggml.scores"),
                                         bool(self._field("tokenizer.ggml.add_space_prefix", True)))
        else:
            raise ConvertError(f"unsupported tokenizer model {kind!r} in {self._path.name}")
        backend.add_special_tokens([
            AddedToken(tok, special=True, normalized=False)
            for tok, kind_ in zip(tokens, types) if kind_ in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)])

        def token(key):
            tid = self._field(key)
            return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None

        eos = [t for t in (token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.eot_token_id"),
                           token("tokenizer.ggml.eom_token_id")) if t]
        config = TokenizerConfig(
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_tokens=tuple(dict.fromkeys(eos)),
            add_bos_token=bool(self._field("tokenizer.ggml.add_bos_token", kind == "llama")),
            chat_template=self._field("tokenizer.chat_template"))
        return Tokenizer(backend, config)


# GGML types kept as stored by `get_blocks`: the format of models/quant.py each is, and its block's bytes
# (an f16 scale, an f16 minimum for Q4_1, then 32 values)
_KEPT = {Q.Q8_0: "q8_0", Q.Q4_0: "int4-g32", Q.Q4_1: "q4_1", Q.Q4_K: "q4_1", Q.Q6_K: "int8-g16"}
_BLOCK_BYTES = {"q8_0": 34, "int4-g32": 18, "q4_1": 20}


def _q4_k_as_q4_1(blocks: np.ndarray) -> dict:
    """Q4_K super-blocks [out, in / 256, 144 bytes] (fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
    minimums, 128 bytes of values) → Q4_1-form parts: w = q · d·sc − dmin·m per group of 32."""
    from gguf.quants import Q4_K

    out, n = blocks.shape[:2]
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [out, n, 1]
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))  # [out·n, 8] each
    scale = (d * sc.reshape(out, n, 8).astype(np.float32)).reshape(out, -1)
    zero = (-(dmin * m.reshape(out, n, 8).astype(np.float32))).reshape(out, -1)
    qs = blocks[..., 16:].reshape(out, n, 4, 1, 32)  # groups 2j and 2j + 1: the low and high nibbles of 32 bytes
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(out, n, 8, 32)
    packed = values[..., :16] | (values[..., 16:] << 4)  # Q4_1's order: byte j holds values j and j + 16
    return {"q": packed.reshape(out, -1), "scale": scale, "zero": zero}


def _q6_k_as_int8(blocks: np.ndarray) -> dict:
    """Q6_K super-blocks [out, in / 256, 210 bytes] (128 bytes of low 4 bits, 64 of high 2 bits, 16
    int8 scales, fp16 d) → int8-g16 parts: w = (q − 32) · d·sc per group of 16, q − 32 in int8."""
    out, n = blocks.shape[:2]
    ql = blocks[..., :128].reshape(out, n, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(out, n, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3).reshape(out, n, 8, 32)  # values 0..63 of each 32
    high = np.concatenate([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=3).reshape(out, n, 8, 32)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scales = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)  # [out, n, 16]
    d = blocks[..., 208:210].copy().view(np.float16).astype(np.float32)  # [out, n, 1]
    return {"q": q.reshape(out, -1), "scale": (d * scales).reshape(out, -1)}


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: within each head, rows (0, 2, 4, …, 1, 3, 5, …) back to
    (0, 1, 2, …); `w` is [heads * head_dim, …]."""
    head_dim = w.shape[0] // heads
    return (w.reshape(heads, head_dim // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre in ("llama-bpe", "llama3")))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = _LLAMA3_SPLIT if pre != "qwen2" else _QWEN2_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    elif pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores, add_space_prefix: bool) -> HFTokenizer:
    """SentencePiece BPE (Llama 2, Mistral): merges are recovered from the vocabulary — a pair (a, b)
    merges when a + b is itself a token, ranked by that token's score."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    merges = []
    for merged in vocab:
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                merges.append((vocab[merged], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-scores[m[0]], m[1], m[2]))
    unk = next((t for t in ("<unk>",) if t in vocab), None)
    backend = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk,
                                     byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return backend

