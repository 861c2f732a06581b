"""Small real models for tests: random transformers models saved as HF folders, and GGUF files
written with the `gguf` package in every supported tensor type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, then special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet(), key=lambda ch: ord(ch))
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + SPECIALS
    return tokens, merges


def write_tokenizer(folder: Path) -> int:
    """tokenizer.json + tokenizer_config.json for a byte-level BPE; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = byte_level_vocab()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                               [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    return len(tokens)


def hf_config(family: str, vocab_size: int, **overrides):
    """A tiny transformers config of each supported family."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=len(byte_level_vocab()[0]) - 2,
                  eos_token_id=len(byte_level_vocab()[0]) - 1)
    if family == "llama":
        cls = transformers.LlamaConfig
        common["rope_scaling"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 32}
    elif family == "mistral":
        cls = transformers.MistralConfig
        common.update(sliding_window=8, rope_theta=1e6)
    elif family == "qwen2":
        cls = transformers.Qwen2Config
        common.update(tie_word_embeddings=True, use_sliding_window=False)
    elif family == "qwen3":
        cls = transformers.Qwen3Config
        common.update(head_dim=16, rope_theta=1e6)
    elif family in ("qwen2_moe", "qwen3_moe"):  # 8 experts, top-2
        cls = transformers.Qwen2MoeConfig if family == "qwen2_moe" else transformers.Qwen3MoeConfig
        common.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=family == "qwen3_moe")
        if family == "qwen2_moe":
            common.update(shared_expert_intermediate_size=48)
        else:
            common.update(head_dim=16)
    elif family == "mixtral":
        cls = transformers.MixtralConfig
        common.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48)
    else:
        raise ValueError(family)
    common.update(overrides)
    return cls(**{k: v for k, v in common.items() if v is not None})


def make_hf_model(family: str, folder: Path, seed: int = 0, max_shard_size: str | None = None, **cfg):
    """A random transformers model of `family`, saved as safetensors (sharded if max_shard_size)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    torch.manual_seed(seed)
    config = hf_config(family, vocab_size=vocab + 12, **cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up of them shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model = model.float().eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return model


# ---- GGUF -------------------------------------------------------------------------------------

def _llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script's Q/K row permutation (halves → interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Where each block's fp16 scales lie (byte offsets), for the types the gguf package cannot quantize.
_BLOCK_SCALES = {"Q2_K": ((80, 0.004), (82, 0.002)), "Q3_K": ((108, 0.002),), "Q4_K": ((0, 0.004), (2, 0.002)),
                 "Q5_K": ((0, 0.002), (2, 0.001)), "Q6_K": ((208, 0.0002),), "IQ4_NL": ((0, 0.0005),),
                 "IQ4_XS": ((0, 0.0005),)}
RANDOM_BLOCK_TYPES = tuple(_BLOCK_SCALES)


def _random_kquant(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random quantized blocks with sane fp16 scales (the gguf package cannot quantize these types)."""
    from gguf import GGML_QUANT_SIZES

    block, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    for offset, scale in _BLOCK_SCALES[qtype.name]:
        blocks[..., offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def llamacpp_rope_factors(config) -> np.ndarray:
    """llama.cpp's convert script's rope_freqs.weight for a Llama 3.1 `rope_parameters`: the divisor of
    each inverse frequency."""
    import math

    rope = config.rope_parameters
    dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(factors, np.float32)


def write_gguf(path: Path, model, qtype, arch: str = "llama", seed: int = 0, rope_freqs: bool = False):
    """Write the transformers `model` as a GGUF file with 2-D weights in `qtype`; norms stay F32.
    rope_freqs: the model's Llama 3.1 RoPE scaling as llama.cpp writes it (rope_freqs.weight).
    arch: GGUF's name ("llama" for Mixtral too); experts are written stacked, as llama.cpp does."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_key_length(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    tokens, merges = byte_level_vocab()
    tokens = tokens + [f"<extra_{i}>" for i in range(c.vocab_size - len(tokens))]
    types = [1] * len(tokens)
    for i, t in enumerate(tokens):
        if t in SPECIALS or t.startswith("<extra_"):
            types[i] = 3
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.down_proj": "ffn_down_exps.weight",
                 "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
                 "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
                 "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
                 "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}
    for i in range(c.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    if getattr(c, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    for key in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:  # [X, 2F, D]: gate, then up
        fused, layer = sd.pop(key), key.split(".")[2]
        half = fused.shape[1] // 2
        sd[f"blk.{layer}.ffn_gate_exps.weight"], sd[f"blk.{layer}.ffn_up_exps.weight"] = fused[:, :half], fused[:, half:]
        names[f"blk.{layer}.ffn_gate_exps.weight"] = f"blk.{layer}.ffn_gate_exps.weight"
        names[f"blk.{layer}.ffn_up_exps.weight"] = f"blk.{layer}.ffn_up_exps.weight"
    for hf_name, arr in sd.items():
        name = names[hf_name]
        if name.endswith("ffn_gate_inp_shexp.weight"):
            arr = arr.reshape(-1)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
            arr = _llamacpp_permute(arr, heads)
        if arr.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype.name in RANDOM_BLOCK_TYPES:
            w.add_tensor(name, _random_kquant(*arr.shape, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", llamacpp_rope_factors(c))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_unsupported_gguf(path: Path) -> None:
    """A GGUF file whose one tensor is Q8_1 (llama.cpp's activation format: no dequantization exists)."""
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    block, nbytes = GGML_QUANT_SIZES[Q.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((4, 64 // block * nbytes), np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_checkpoint(config, folder: Path, seed: int):
    """A random model of `config` with the byte-level test tokenizer (written into `folder`), in memory.
    Weights are scaled up so logits sit far apart and greedy decoding never hangs on a near-tie."""
    import jax
    import numpy as np
    from tokenizers import Tokenizer as HFTokenizer

    from meshserve.models.checkpoint import Checkpoint
    from meshserve.models.decoder import init_params
    from meshserve.models.tokenizer import Tokenizer, TokenizerConfig

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    tok = Tokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")),
                    TokenizerConfig("<|im_start|>", ("<|im_end|>",), False, CHAT_TEMPLATE))
    params = jax.tree.map(lambda a: a * 20 if a.ndim > 1 else a, init_params(config, seed=seed))
    return Checkpoint(path=None, config=config, tokenizer=tok, dtype=np.dtype("float32"), params=params)


# Structured-output cases (tests/runtime/test_grammar.py, benchmarks/structured.py): one constraint
# of each kind, with what its output must be. Bounded, so a model sampling at temperature 1 ends.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,8}-[0-9]{2,4}(\.[a-z]{2,3})?"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
LARK = '''start: item ("," item){0,3}
item: NAME "=" VALUE
NAME: /[a-z]{1,6}/
VALUE: /[0-9]{1,4}/ | "true" | "false"
'''
LARK_MATCHES = r"[a-z]{1,6}=([0-9]{1,4}|true|false)(,[a-z]{1,6}=([0-9]{1,4}|true|false)){0,3}"


def guided_cases():
    """(name, Guided, check(text) raising AssertionError or a jsonschema error when text is wrong)."""
    import json
    import re

    import jsonschema

    from meshserve.runtime.grammar import Guided

    def schema_ok(text):
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)

    def object_ok(text):
        assert isinstance(json.loads(text), dict), text

    def regex_ok(text):
        assert re.fullmatch(REGEX, text, re.ASCII), text

    def choice_ok(text):
        assert text in CHOICES, text

    def lark_ok(text):
        assert re.fullmatch(LARK_MATCHES, text, re.ASCII), text

    return [("json_schema", Guided.json_schema(PERSON_SCHEMA), schema_ok),
            ("json_object", Guided("json_object"), object_ok),
            ("regex", Guided("regex", REGEX), regex_ok),
            ("choice", Guided.choice(CHOICES), choice_ok),
            ("grammar", Guided("grammar", LARK), lark_ok)]
