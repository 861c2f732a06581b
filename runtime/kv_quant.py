"""The KV cache in 8 bits: int8 or fp8 (e4m3) codes with a dynamic scale per token and kv head.

    stored:   codes  [.., kv_heads, head_dim]  int8 | float8_e4m3fn
              exps   [.., kv_heads]            int8 s       value = code · 2^(s/4)

Each token's key (and value) vector of each kv head gets its own scale when it is written, from its
own largest element: nothing is calibrated, and an outlier token widens only its own scale (a static
per-tensor scale of 1.0 clips it, or wastes the codes of every other token). A scale is one byte, a
power of 2^(1/4) (quarter-octave steps, from 2^-32 to 2^31.75): the row's largest element lands in
the top 2^-1/4 of the code range, so int8 keeps ~7 of its bits, where a power-of-two scale (OCP
microscaling's E8M0) keeps between 6 and 7 and, in the outlier test, doubles the error. For the
default model's head_dim 64 a token costs 65 bytes per head where float32 costs 256 (3.94×) and
bfloat16 128 (1.97×); a two-byte scale would cost 66 (3.88×). fp8 codes keep their 3-bit mantissa's
relative precision whatever the scale.
"""

from __future__ import annotations

import dataclasses

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from meshserve.models.config import KV_CACHE_DTYPES
from meshserve.models.errors import ConfigError

# engine.kv_cache_dtype → the cache's element type (auto: the model's own dtype)
_ELEMENT = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8,
            "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn}
assert tuple(_ELEMENT) == KV_CACHE_DTYPES
_QMAX = {np.dtype(jnp.int8): 127.0, np.dtype(jnp.float8_e4m3fn): 448.0}
STEPS = 4  # scale steps per octave
_QUARTERS = tuple(float(np.float32(2 ** (k / STEPS))) for k in (1, 2, 3))
# names the encoding in the model fingerprint: pages stored under another one are never read as these
SCHEME = "token-head-scale-2^(s/4)-v1"


def cache_dtype(name: str, model_dtype):
    """The element type of engine.kv_cache_dtype `name` for a model of `model_dtype`."""
    return jnp.dtype(_ELEMENT[name] or model_dtype)


def check_readable(dtype, attention: str, target) -> None:
    """ConfigError when the chosen attention cannot read a cache of `dtype` on `target`
    (runtime/target.Target): the Pallas kernels read fp8 codes through Triton, which converts e4m3
    only from compute capability 8.9 (Ada, Hopper) on."""
    cc = target.compute_capability
    numeric = re.fullmatch(r"(\d+)\.(\d+)", cc or "")  # CUDA's; another vendor's GPU: not known here
    if (attention == "pallas" and target.platform == "gpu" and np.dtype(dtype) == np.dtype(jnp.float8_e4m3fn)
            and numeric and tuple(map(int, numeric.groups())) < (8, 9)):
        raise ConfigError(f"kv_cache_dtype fp8: attention pallas cannot read fp8 on {target.device_kind or 'this GPU'} "
                          f"(compute capability {cc}, fp8 needs 8.9); use kv_cache_dtype int8 or attention: reference")


def is_quantized(dtype) -> bool:
    return np.dtype(dtype) in _QMAX


def token_bytes(dtype, head_dim: int) -> int:
    """Bytes one token's key (or value) of one kv head takes: its codes, and its scale if quantized."""
    return head_dim * np.dtype(dtype).itemsize + (1 if is_quantized(dtype) else 0)


def scale_of(s):
    """2^(s/4) as float32 for int8 exponents s, built the same on every backend (no exp2, whose
    rounding differs between XLA and Triton): a float32 constant 2^(r/4), r = s mod 4, times
    2^⌊s/4⌋ set in the exponent field."""
    s = s.astype(jnp.int32)
    r, octave = s & (STEPS - 1), s >> 2
    frac = jnp.where(r == 0, 1.0, jnp.where(r == 1, _QUARTERS[0], jnp.where(r == 2, _QUARTERS[1], _QUARTERS[2])))
    return frac.astype(jnp.float32) * lax.bitcast_convert_type((octave + 127) << 23, jnp.float32)


def quantize(x, dtype):
    """x [..., E] (float) → codes [..., E] of `dtype` and scale exponents s [...] int8: the
    smallest scale 2^(s/4) that brings each row's largest magnitude within the dtype's range."""
    qmax = _QMAX[np.dtype(dtype)]
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    s = jnp.clip(jnp.ceil(STEPS * jnp.log2(amax / qmax)), -128, 127)  # amax 0: -inf, clipped
    scaled = jnp.clip(x * scale_of(-s)[..., None], -qmax, qmax)  # the clip only absorbs log2's rounding
    codes = jnp.round(scaled).astype(dtype) if np.dtype(dtype) == np.dtype(jnp.int8) else scaled.astype(dtype)
    return codes, s.astype(jnp.int8)


def dequantize(codes, exps, dtype):
    """codes [..., E] · 2^(exps/4) [...], in `dtype`."""
    return (codes.astype(jnp.float32) * scale_of(exps)[..., None]).astype(dtype)


def static_quantize(x, dtype, scale: float = 1.0):
    """What a static per-tensor scale makes of x (clipped at the dtype's range), dequantized: the
    behaviour of a cache without dynamic scales, for comparison (tests, benchmarks)."""
    qmax = _QMAX[np.dtype(dtype)]
    scaled = jnp.clip(x.astype(jnp.float32) / scale, -qmax, qmax)
    codes = jnp.round(scaled) if np.dtype(dtype) == np.dtype(jnp.int8) else scaled.astype(dtype).astype(jnp.float32)
    return (codes * scale).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedAttention:
    """A models.decoder.KVCache that caches nothing: each layer's keys and values quantized and
    dequantized as an 8-bit pool stores them, then dense attention within the call. The forward pass
    over a whole sequence with it is what the engine computes over an int8 / fp8 pool (its reference
    in tests, and how benchmarks/quant_cpu.py scores a KV dtype)."""

    dtype: object = dataclasses.field(metadata=dict(static=True))

    def attend(self, layer, q, k, v, positions, sliding_window):
        from meshserve.models.decoder import attention

        k, v = (dequantize(*quantize(x, self.dtype), x.dtype) for x in (k, v))
        return attention(q, k, v, positions, positions, sliding_window), self
