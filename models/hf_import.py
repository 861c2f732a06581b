"""Hugging Face import: config.json + one or sharded *.safetensors + tokenizer.json.

fp8 checkpoints with block scales (DeepSeek's and Qwen's: `quantization_config.quant_method: fp8`,
`weight_block_size: [128, 128]`, each fp8 `…weight` beside a float32 `…weight_scale_inv` of one scale
per block, w = q · scale_inv) are dequantized, or kept as they are with `--quantize fp8-block`.

Safetensors files are read here with numpy memory maps (the `safetensors` numpy reader has no
bfloat16): 8 bytes of little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw tensor bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from meshserve.models import generation
from meshserve.models.config import ModelConfig
from meshserve.models.convert import TensorSource
from meshserve.models.errors import ConfigError, ConvertError
from meshserve.models.tokenizer import Tokenizer, TokenizerConfig

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "F8_E4M3": ml_dtypes.float8_e4m3fn}
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
_INDEX = "model.safetensors.index.json"

_GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
_LAYER = {
    "input_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
    "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "shared_gate": "mlp.shared_expert.gate_proj.weight", "shared_up": "mlp.shared_expert.up_proj.weight",
    "shared_down": "mlp.shared_expert.down_proj.weight", "shared_expert_gate": "mlp.shared_expert_gate.weight",
}
# Experts, in the layouts checkpoints come in: transformers 5's fused 3-D tensors, and one tensor per
# expert (what published checkpoints hold: Qwen's `mlp.experts.E.gate_proj`, Mixtral's
# `block_sparse_moe.experts.E.w1`, with w1 the gate, w3 the up and w2 the down projection).
_FUSED = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj"}
_PER_EXPERT = {
    "mlp": {"router": "mlp.gate.weight", "experts_gate": "mlp.experts.{e}.gate_proj.weight",
            "experts_up": "mlp.experts.{e}.up_proj.weight", "experts_down": "mlp.experts.{e}.down_proj.weight"},
    "block_sparse_moe": {"router": "block_sparse_moe.gate.weight",
                         "experts_gate": "block_sparse_moe.experts.{e}.w1.weight",
                         "experts_up": "block_sparse_moe.experts.{e}.w3.weight",
                         "experts_down": "block_sparse_moe.experts.{e}.w2.weight"},
}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path.name} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConvertError(f"{path.name} is truncated (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ConvertError(f"{path.name} has a corrupt safetensors header") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._header = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self._base + end > size:
            raise ConvertError(f"{path.name} is truncated: tensors end at byte {self._base + end}, "
                               f"the file has {size}")

    def names(self):
        return self._header.keys()

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConvertError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._base + start,
                         shape=(stop - start,))
        return data.view(dtype).reshape(info["shape"])


class HFSource(TensorSource):
    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise ConvertError(f"HF model folder {folder} does not exist")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConvertError(f"{folder} has no config.json")
        try:
            hf = json.loads(config_path.read_text())
            self.config = ModelConfig.from_hf(hf, name=folder.name)
        except ConfigError as e:
            raise ConvertError(str(e)) from None
        except ValueError as e:
            raise ConvertError(f"{config_path} is not valid JSON: {e}") from None
        quantized = hf.get("quantization_config") or {}
        # (rows, columns) of an fp8 weight each weight_scale_inv element scales; None: not an fp8 checkpoint
        self._fp8_block = None
        if quantized.get("quant_method") == "fp8":
            if len(quantized.get("weight_block_size") or ()) != 2:
                raise ConvertError(f"{config_path}: an fp8 quantization_config without a weight_block_size of "
                                   f"two sizes (per-tensor fp8 scales are not read)")
            self._fp8_block = tuple(quantized["weight_block_size"])
        self._where = self._index(folder)
        self._files: dict[str, SafetensorsFile] = {}
        self._folder = folder
        self.tokenizer = self._read_tokenizer(folder)
        self.generation = generation.read_hf_folder(folder)

    def _index(self, folder: Path) -> dict[str, str]:
        """tensor name → file name, from the shard index or the one model.safetensors."""
        index = folder / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise ConvertError(f"{folder} is missing shard(s) listed in {_INDEX}: {', '.join(missing)}")
            return weight_map
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{folder} has no *.safetensors file")
        if len(files) > 1:
            raise ConvertError(f"{folder} has {len(files)} safetensors files but no {_INDEX}")
        return {name: files[0].name for name in SafetensorsFile(files[0]).names()}

    def _name(self, role, layer):
        if layer is None:
            return _GLOBAL[role]
        prefix = f"model.layers.{layer}."
        if role in _LAYER:
            return prefix + _LAYER[role]
        if role in ("experts_gate", "experts_up") and prefix + _FUSED["gate_up"] in self._where:
            return prefix + _FUSED["gate_up"]
        if role == "experts_down" and prefix + _FUSED["down"] in self._where:
            return prefix + _FUSED["down"]
        block = "block_sparse_moe" if prefix + _PER_EXPERT["block_sparse_moe"]["router"] in self._where else "mlp"
        return prefix + _PER_EXPERT[block][role]

    def has(self, role, layer=None):
        return self._name(role, layer).format(e=0) in self._where

    def tensor_name(self, role, layer=None):
        return self._name(role, layer).format(e="E")

    def get(self, role, layer=None):
        name = self._name(role, layer)
        if "{e}" in name:
            return self._experts(name)
        w = self._float(name)
        if name.endswith(_FUSED["gate_up"]):  # [X, 2F, D]: the gate's rows, then the up projection's
            half = w.shape[1] // 2
            w = w[:, :half] if role == "experts_gate" else w[:, half:]
        return w

    def get_blocks(self, role, layer=None, fmt=None):
        """An fp8 checkpoint's 128×128-block weight as stored, for `fp8-block`: {"q": fp8 [out, in],
        "scale": [out, in / 128]} (each block's scale repeated over its 128 rows, so the converter's
        reshapes of the output axis apply to it; models/quant.collapse_scales takes one per block)."""
        if fmt != "fp8-block" or self._fp8_block != (128, 128):
            return None
        name = self._name(role, layer)
        if "{e}" in name or name not in self._where:
            return None  # experts stored one tensor per expert are dequantized
        w = self._tensor(name)
        if w.dtype != _FP8 or w.ndim != 2 or w.shape[0] % 128 or w.shape[1] % 128:
            return None
        return {"q": np.asarray(w), "scale": np.repeat(self._block_scale(name, w.shape), 128, axis=0)}

    def _float(self, name: str) -> np.ndarray:
        """A tensor as float32: an fp8 weight times its block scales."""
        w = self._tensor(name)
        if w.dtype != _FP8:
            return w.astype(np.float32)
        if w.ndim != 2:
            raise ConvertError(f"{self._folder}: {name} is fp8 with {w.ndim} axes; only 2-D fp8 weights are read")
        scale = self._block_scale(name, w.shape)  # (names what is missing first)
        rows, cols = self._fp8_block
        scale = np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)
        return w.astype(np.float32) * scale[:w.shape[0], :w.shape[1]]

    def _block_scale(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The weight_scale_inv of fp8 weight `name`: one float32 per block of quantization_config's size."""
        scale_name = name + "_scale_inv"
        if self._fp8_block is None or scale_name not in self._where:
            raise ConvertError(f"{self._folder}: {name} is fp8, but the checkpoint has no {scale_name} "
                               f"or its config.json no quantization_config of quant_method fp8")
        rows, cols = self._fp8_block
        want = (-(-shape[0] // rows), -(-shape[1] // cols))
        scale = self._tensor(scale_name)
        if tuple(scale.shape) != want:
            raise ConvertError(f"{self._folder}: {scale_name} has shape {tuple(scale.shape)}, expected {want} "
                               f"(blocks of {rows}×{cols} over {name}'s {tuple(shape)})")
        return scale.astype(np.float32)

    def _experts(self, pattern: str) -> np.ndarray:
        """One tensor per expert stacked on a leading axis; their count must be the config's."""
        X, found = self.config.num_experts, 0
        while pattern.format(e=found) in self._where:
            found += 1
        if found != X:
            raise ConvertError(f"{self._folder}: {pattern.format(e='E')} holds {found} experts, "
                               f"the config says {X}")
        return np.stack([self._float(pattern.format(e=e)) for e in range(X)])

    def _tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConvertError(f"{self._folder} has no tensor {name}")
        file = self._where[name]
        if file not in self._files:
            self._files[file] = SafetensorsFile(self._folder / file)
        return self._files[file].get(name)

    def _read_tokenizer(self, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ConvertError(f"{folder} has no tokenizer.json")
        backend = HFTokenizer.from_file(str(path))
        extra = {}
        if (folder / "tokenizer_config.json").is_file():
            extra = json.loads((folder / "tokenizer_config.json").read_text())

        def text(token):  # tokenizer_config.json writes tokens as strings or {"content": ...}
            return token.get("content") if isinstance(token, dict) else token

        c = self.config

        def token_of(tid):
            return None if tid is None else backend.id_to_token(tid)

        bos = text(extra.get("bos_token")) or token_of(c.bos_token_id)
        eos = [text(extra.get("eos_token"))] + [token_of(t) for t in c.eos_token_ids]
        template = extra.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        # Whether BOS is prepended is said by tokenizer_config.json or, as for Llama 3, only by
        # tokenizer.json's post-processor: ask the post-processor.
        with_special = backend.encode("a", add_special_tokens=True).ids
        adds_bos = bos is not None and with_special[:1] == [backend.token_to_id(bos)]
        config = TokenizerConfig(bos_token=bos, eos_tokens=tuple(dict.fromkeys(t for t in eos if t)),
                                 add_bos_token=bool(extra.get("add_bos_token", adds_bos)),
                                 chat_template=template)
        return Tokenizer(backend, config)
