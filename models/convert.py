"""Turning a source model (GGUF file or HF safetensors folder) into a meshserve checkpoint.

Both importers present their tensors through one small interface, `TensorSource`, in Hugging Face
layout (`[out_features, in_features]`, RoPE halves not interleaved). `build_params` maps that layout
onto the params tree of models/decoder.py, one tensor at a time so peak host memory stays near one
copy of the model.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConvertError
from meshserve.models.decoder import Params
from meshserve.models.tokenizer import Tokenizer

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Tensor roles, per layer unless global. Names follow HF's Llama naming; the expert roles are stacked
# over a leading expert axis ([X, F, D] for experts_gate/experts_up, [X, D, F] for experts_down).
GLOBAL_ROLES = ("embed", "norm", "lm_head")
LAYER_ROLES = ("input_norm", "post_attn_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias",
               "q_norm", "k_norm", "gate", "up", "down", "router", "experts_gate", "experts_up",
               "experts_down", "shared_gate", "shared_up", "shared_down", "shared_expert_gate")


# The linear layers' weights: what a quantized model holds quantized (models/decoder.py's _weight).
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down", "experts_gate", "experts_up", "experts_down",
                "shared_gate", "shared_up", "shared_down")


class TensorSource(abc.ABC):
    """A model's config, tokenizer and tensors, in HF layout, as float32 numpy arrays."""

    config: ModelConfig
    tokenizer: Tokenizer
    generation: dict = {}  # sampling defaults (models/generation.py)

    @abc.abstractmethod
    def has(self, role: str, layer: int | None = None) -> bool: ...

    @abc.abstractmethod
    def get(self, role: str, layer: int | None = None) -> np.ndarray: ...

    def get_blocks(self, role: str, layer: int | None = None, fmt: str | None = None) -> dict | None:
        """The tensor as the source stores it, when that is `fmt` of models/quant.py: its quantized
        parts in HF layout ([out, in] values, [out, in / group] scales), else None (the default)."""
        return None

    def tensor_name(self, role: str, layer: int | None = None) -> str:
        """The source's own name of a role's tensor, for error messages."""
        return role if layer is None else f"layer {layer} {role}"


def build_params(source: TensorSource, dtype: np.dtype, progress: bool = True, keep: str | None = None) -> Params:
    """The params tree of the source's tensors in `dtype`; `keep`: a quantized format the source may
    store tensors in (models/quant.py), whose tensors are taken as stored, not dequantized."""
    c = source.config
    D, H, K, E = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

    def fetch(role, layer=None, shape=None, transform: Callable = lambda w: w):
        # transforms reshape with -1 on the input axis: they apply to a weight's quantized parts too
        blocks = source.get_blocks(role, layer, keep) if keep and role in LINEAR_ROLES else None
        if blocks is not None:
            try:
                return {k: np.ascontiguousarray(transform(v)) for k, v in blocks.items()}
            except ValueError:  # 128×128 fp8 blocks across heads of 64: dequantized, quantized here again
                if keep != "fp8-block":
                    raise
        w = source.get(role, layer)
        if shape is not None and tuple(w.shape) != shape:
            raise ConvertError(f"tensor {source.tensor_name(role, layer)} has shape {tuple(w.shape)}, "
                               f"expected {shape} from the config")
        return np.ascontiguousarray(transform(w)).astype(dtype)

    params: Params = {"embed": fetch("embed", shape=(c.vocab_size, D))}
    layers = {}
    # disable=None: the bar shows on a terminal only, not in logs
    bar = tqdm(range(c.num_layers), desc="converting", unit="layer", disable=None if progress else True)
    for i in bar:
        attn = {
            "q_proj": fetch("q", i, (H * E, D), lambda w: w.T.reshape(-1, H, E)),
            "k_proj": fetch("k", i, (K * E, D), lambda w: w.T.reshape(-1, K, E)),
            "v_proj": fetch("v", i, (K * E, D), lambda w: w.T.reshape(-1, K, E)),
            "o_proj": fetch("o", i, (D, H * E), lambda w: w.T.reshape(H, -1, D)),
        }
        if c.attention_bias:
            attn["q_bias"] = fetch("q_bias", i, (H * E,), lambda b: b.reshape(H, E))
            attn["k_bias"] = fetch("k_bias", i, (K * E,), lambda b: b.reshape(K, E))
            attn["v_bias"] = fetch("v_bias", i, (K * E,), lambda b: b.reshape(K, E))
        if c.qk_norm:
            attn["q_norm"] = {"weight": fetch("q_norm", i, (E,))}
            attn["k_norm"] = {"weight": fetch("k_norm", i, (E,))}
        layers[i] = {
            "input_norm": {"weight": fetch("input_norm", i, (D,))},
            "attn": attn,
            "post_attn_norm": {"weight": fetch("post_attn_norm", i, (D,))},
            "mlp": _moe(fetch, c, i) if c.is_moe_layer(i) else _mlp(fetch, c, i, ("gate", "up", "down")),
        }
    params["layers"] = layers
    params["norm"] = {"weight": fetch("norm", shape=(D,))}
    if not c.tie_word_embeddings:
        params["lm_head"] = fetch("lm_head", shape=(c.vocab_size, D), transform=np.transpose)
    return params


def _mlp(fetch, c: ModelConfig, i: int, roles: tuple[str, str, str], width: int | None = None) -> dict:
    D, F = c.hidden_size, width or c.intermediate_size
    gate, up, down = roles
    return {"gate_proj": fetch(gate, i, (F, D), np.transpose), "up_proj": fetch(up, i, (F, D), np.transpose),
            "down_proj": fetch(down, i, (D, F), np.transpose)}


def _moe(fetch, c: ModelConfig, i: int) -> dict:
    D, F, X = c.hidden_size, c.moe_intermediate_size, c.num_experts

    def experts(w):  # [X, out, in] → [X, in, out]
        return w.transpose(0, 2, 1)

    out = {"router": fetch("router", i, (X, D), np.transpose),
           "gate_proj": fetch("experts_gate", i, (X, F, D), experts),
           "up_proj": fetch("experts_up", i, (X, F, D), experts),
           "down_proj": fetch("experts_down", i, (X, D, F), experts)}
    if c.shared_expert_intermediate_size:
        out["shared"] = _mlp(fetch, c, i, ("shared_gate", "shared_up", "shared_down"),
                             c.shared_expert_intermediate_size)
        out["shared_gate"] = fetch("shared_expert_gate", i, (1, D), np.transpose)
    return out


def open_source(spec: str) -> TensorSource:
    """`gguf:FILE` or `hf:DIR` → a TensorSource; errors name what is wrong with the input."""
    kind, sep, location = spec.partition(":")
    if not sep or kind not in ("gguf", "hf") or not location:
        raise ConvertError(f"--from must be gguf:FILE or hf:DIR, got {spec!r}")
    path = Path(location).expanduser()
    if kind == "gguf":
        from meshserve.models.gguf_import import GGUFSource
        return GGUFSource(path)
    from meshserve.models.hf_import import HFSource
    return HFSource(path)


def convert(spec: str, out: str | Path, dtype: str = "float32", progress: bool = True,
            quantize: str | None = None) -> Path:
    """Import `spec` and write a checkpoint folder at `out` (which must not exist yet); dtype "auto":
    the source's (models/sources.py); `quantize`: the linear layers' weights in that format of
    models/quant.py (the rest in `dtype`)."""
    import dataclasses

    from meshserve.models.checkpoint import save_checkpoint, check_new_folder
    from meshserve.models.config import QUANTIZATIONS

    if dtype not in (*DTYPES, "auto"):
        raise ConvertError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConvertError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    out = check_new_folder(out)  # fail before the slow part
    source = open_source(spec)
    if dtype == "auto":
        from meshserve.models.sources import source_dtype

        kind, _, location = spec.partition(":")
        dtype = source_dtype(kind, Path(location).expanduser())
    params = build_params(source, DTYPES[dtype], progress=progress, keep=quantize)
    config = source.config
    if quantize is not None:
        from meshserve.models.decoder import quantize_params

        config = dataclasses.replace(config, quantization=quantize)
        try:
            params = quantize_params(params, config)
        except ValueError as e:
            raise ConvertError(f"--quantize {quantize}: {e}") from None
    return save_checkpoint(out, config, params, source.tokenizer, source=spec.split(":", 1)[0],
                           generation=source.generation)


def convert_into_cache(spec: str, out: Path, dtype: str, progress: bool = True,
                       quantize: str | None = None) -> Path:
    """`convert` into a cache folder that other processes may be filling with the same conversion at
    the same time: the first to finish renames it into place, the others use theirs."""
    from meshserve.models.errors import CheckpointError

    try:
        return convert(spec, out, dtype=dtype, progress=progress, quantize=quantize)
    except CheckpointError:
        if not out.is_dir():
            raise
        return out
