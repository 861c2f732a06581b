"""Quantized weights: the formats, quantizing a float weight, and the matmul that reads one.

A quantized weight is stored as integers or fp8 values `q` with float32 scales (and, for asymmetric
formats, offsets `zero`) over blocks of the weight:

    w = q · scale (+ zero)        scale, zero broadcast over each block

A weight's axes are [batch…][contraction…][output…] (an MoE's experts are the batch axis). Formats
choose blocks along the contraction axes (`group`: per channel when None, else groups of that many
inputs) and along the output axes (`out_block`: 1, or 128 for the 128×128-block fp8 checkpoints
DeepSeek and Qwen publish). Where a block spans several axes (o_proj's heads × head_dim), it is split
over the trailing ones (`split_block`).

4-bit values are packed two to a byte along the last contraction axis, within each group's part of
it (g elements): byte j holds element j in its low nibble and element j + g/2 in its high one, stored as v + 8 for a
signed value v (GGUF's Q4_0/Q4_1 layout, so those files import as a byte copy).

Two ways to multiply (`dot`):
- weight only (every format): the weight is dequantized inside the program and multiplied in the
  activations' dtype; the result equals `x @ dequantize(w)`.
- dynamic activations ("w8a8", "w8a8-fp8"): each token's activations are quantized with their own
  scale (max |x| of the row), one integer or fp8 matmul, both scales applied to the result. XLA:CPU
  runs an int8 × int8 → int32 dot about 2× faster than the f32 one for decode's few rows (the weight
  stream is a quarter); GPUs get int8 or fp8 GEMMs.

Shapes: M rows, K contraction (flattened), N outputs (flattened).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from meshserve.models.config import QUANTIZATIONS


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    dtype: str  # of `q`: "int8", "float8_e4m3fn", or "int4" (packed two to a uint8)
    group: int | None = None  # inputs per scale along the contraction axes; None: one per output channel
    out_block: int = 1  # outputs per scale
    zero: bool = False  # an offset per block (asymmetric)
    activations: str | None = None  # dynamic per-token quantization of the activations: "int8" | "float8_e4m3fn"
    about: str = ""

    @property
    def packed(self) -> bool:
        return self.dtype == "int4"

    @property
    def bits(self) -> int:
        return 4 if self.packed else 8

    @property
    def qmax(self) -> float:
        return {"int8": 127.0, "float8_e4m3fn": 448.0, "int4": 7.0}[self.dtype]


FORMATS = {f.name: f for f in (
    Format("int8", "int8", about="int8 weights, a scale per output channel; float activations"),
    Format("w8a8", "int8", activations="int8",
           about="int8 weights per output channel × int8 activations per token (dynamic scales)"),
    Format("fp8", "float8_e4m3fn", about="fp8 e4m3 weights, a scale per output channel; float activations"),
    Format("fp8-block", "float8_e4m3fn", group=128, out_block=128,
           about="fp8 e4m3 weights, a scale per 128×128 block (DeepSeek's and Qwen's fp8 checkpoints)"),
    Format("w8a8-fp8", "float8_e4m3fn", activations="float8_e4m3fn",
           about="fp8 weights per output channel × fp8 activations per token (GPUs' fp8 GEMM)"),
    Format("int4-g32", "int4", group=32, about="4-bit weights, a scale per 32 inputs (GGUF Q4_0's form)"),
    Format("int4-g128", "int4", group=128, about="4-bit weights, a scale per 128 inputs"),
    Format("q8_0", "int8", group=32, about="GGUF Q8_0 as stored: int8, a scale per 32 inputs"),
    Format("q4_1", "int4", group=32, zero=True,
           about="GGUF Q4_1 as stored: 4-bit, a scale and a minimum per 32 inputs"),
    Format("int8-g16", "int8", group=16,
           about="int8 weights, a scale per 16 inputs (GGUF Q6_K's form: its 6-bit values and scales kept)"),
)}


assert tuple(FORMATS) == QUANTIZATIONS, "models/config.py names the formats too"


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown quantization {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def split_block(sizes: tuple[int, ...], block: int) -> tuple[int, ...]:
    """A block of `block` elements of the flattened trailing `sizes`, as a block size per axis: the
    last axis first, whole axes before it when the block is larger; one block of all when the axes
    hold fewer elements (ValueError when it does not tile them)."""
    if block >= math.prod(sizes):
        return tuple(sizes)
    out, rest = [], block
    for size in reversed(sizes):
        if rest <= 1:
            out.append(1)
        elif size % rest == 0:
            out.append(rest)
            rest = 1
        elif rest % size == 0:
            out.append(size)
            rest //= size
        else:
            raise ValueError(f"blocks of {block} do not tile axes of sizes {sizes}")
    if rest > 1:
        raise ValueError(f"blocks of {block} are larger than axes of sizes {sizes}")
    return tuple(reversed(out))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a weight's batch, contraction and output axes are, and the format's block per axis."""

    shape: tuple[int, ...]
    batch: int  # leading batch axes (an MoE's experts)
    contract: int  # then this many contraction axes; the rest are outputs
    format: Format

    @property
    def block(self) -> tuple[int, ...]:
        b, c = self.batch, self.contract
        contract, outputs = self.shape[b:b + c], self.shape[b + c:]
        f = self.format
        inner = contract if f.group is None else split_block(contract, f.group)
        return (1,) * b + tuple(inner) + split_block(outputs, f.out_block)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return tuple(s // b for s, b in zip(self.shape, self.block))

    @property
    def pack_axis(self) -> int:
        """The axis 4-bit values are packed along (the last contraction axis)."""
        return self.batch + self.contract - 1

    @property
    def q_shape(self) -> tuple[int, ...]:
        if not self.format.packed:
            return self.shape
        a = self.pack_axis
        return self.shape[:a] + (self.shape[a] // 2,) + self.shape[a + 1:]

    @property
    def q_dtype(self):
        return jnp.uint8 if self.format.packed else jnp.dtype(self.format.dtype)

    def check(self) -> None:
        """ValueError when the format cannot lay out this weight."""
        block = self.block
        if self.format.packed and block[self.pack_axis] % 2:
            raise ValueError(f"{self.format.name}: a group's part of the last input axis must be even "
                             f"to pack 4-bit values (shape {self.shape}, blocks {block})")


def collapse_scales(parts: dict, geometry: Geometry) -> dict:
    """Parts whose scales are given per output channel where the format blocks the outputs too (an HF
    fp8 checkpoint's 128×128 blocks, repeated along its rows so the converter's reshapes apply), with
    one scale per block. ValueError when scales differ within a block; other parts are returned as
    they are (check_parts names what does not fit)."""
    scale, want = parts["scale"], geometry.scale_shape
    if tuple(scale.shape) == want or len(scale.shape) != len(want):
        return parts
    steps = []
    for axis, (have, need) in enumerate(zip(scale.shape, want)):
        outputs = axis >= geometry.batch + geometry.contract
        if have != need and not (outputs and have == geometry.shape[axis] and have % need == 0):
            return parts
        steps.append(have // need)
    collapsed = scale[tuple(slice(None, None, k) for k in steps)]
    expanded = collapsed
    for axis, k in enumerate(steps):
        expanded = np.repeat(expanded, k, axis=axis)
    if not np.array_equal(expanded, scale):
        raise ValueError(f"scales differ within a block of {geometry.format.name}")
    return {**parts, "scale": collapsed}


def check_parts(parts: dict, geometry: Geometry, name: str) -> None:
    """ValueError naming the weight when its parts are not `geometry`'s (a scale of another shape)."""
    want = {"q": (geometry.q_shape, geometry.q_dtype), "scale": (geometry.scale_shape, np.float32)}
    if geometry.format.zero:
        want["zero"] = (geometry.scale_shape, np.float32)
    if set(parts) != set(want):
        raise ValueError(f"{name}: parts {sorted(parts)}, expected {sorted(want)} for {geometry.format.name}")
    for key, (shape, dtype) in want.items():
        a = parts[key]
        if tuple(a.shape) != tuple(shape) or np.dtype(a.dtype) != np.dtype(dtype):
            raise ValueError(f"{name}: {key} is {np.dtype(a.dtype).name}{list(a.shape)}, expected "
                             f"{np.dtype(dtype).name}{list(shape)} for {geometry.format.name}")


def _blocked(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Each axis split into (blocks, block size): the form a scale broadcasts over."""
    return tuple(d for s, b in zip(shape, block) for d in (s // b, b))


def _expand(scale: Array) -> Array:
    """scale [n0, n1, …] → [n0, 1, n1, 1, …], to multiply a blocked weight."""
    return scale.reshape(tuple(d for n in scale.shape for d in (n, 1)))


def pack_int4(v: np.ndarray | Array, axis: int, group: int):
    """Values 0..15 → bytes, two per byte within each group along `axis` (see the module's doc)."""
    xp = jnp if isinstance(v, jax.Array) else np
    shape = v.shape
    v = v.reshape(shape[:axis] + (shape[axis] // group, 2, group // 2) + shape[axis + 1:]).astype(xp.uint8)
    lo = xp.take(v, 0, axis=axis + 1)
    hi = xp.take(v, 1, axis=axis + 1)
    packed = lo | (hi << 4)
    return packed.reshape(shape[:axis] + (shape[axis] // 2,) + shape[axis + 1:])


def unpack_int4(p: Array, axis: int, group: int) -> Array:
    """The inverse of `pack_int4`: uint8 → values 0..15 (uint8), the axis twice as long."""
    shape = p.shape
    p = p.reshape(shape[:axis] + (shape[axis] * 2 // group, 1, group // 2) + shape[axis + 1:])
    v = jnp.concatenate([p & 0xF, p >> 4], axis=axis + 1)
    return v.reshape(shape[:axis] + (shape[axis] * 2,) + shape[axis + 1:])


def quantize(w, geometry: Geometry) -> dict:
    """A float weight → {"q", "scale"[, "zero"]} in `geometry`'s format: numpy in, numpy out (a
    converter, on the host); a jax array in, jax arrays out (random init inside a program)."""
    geometry.check()
    xp = np if isinstance(w, np.ndarray) else jnp
    f, block = geometry.format, geometry.block
    blocked = w.astype(np.float32).reshape(_blocked(geometry.shape, block))
    inner = tuple(range(1, blocked.ndim, 2))
    if f.zero:
        lo, hi = blocked.min(axis=inner, keepdims=True), blocked.max(axis=inner, keepdims=True)
        scale = (hi - lo) / 15
        v = xp.clip(xp.round((blocked - lo) / xp.where(scale == 0, 1, scale)), 0, 15)
        out = {"scale": scale, "zero": lo}
    else:
        scale = xp.abs(blocked).max(axis=inner, keepdims=True) / f.qmax
        v = blocked / xp.where(scale == 0, 1, scale)
        if f.dtype == "float8_e4m3fn":
            v = v.astype(jnp.float8_e4m3fn)
        else:
            v = xp.clip(xp.round(v), -f.qmax, f.qmax)
            v = v + 8 if f.packed else v  # 4-bit: stored as v + 8 (GGUF's Q4_0)
        out = {"scale": scale}
    v = v.reshape(geometry.shape)
    out = {k: a.reshape(geometry.scale_shape).astype(np.float32) for k, a in out.items()}
    q = pack_int4(v, geometry.pack_axis, block[geometry.pack_axis]) if f.packed else v.astype(geometry.q_dtype)
    return {"q": q, **out}


def dequantize(weight: dict[str, Array], geometry: Geometry, dtype=jnp.float32) -> Array:
    """{"q", "scale"[, "zero"]} → the float weight (in `dtype`), inside a program."""
    f, block = geometry.format, geometry.block
    q = weight["q"]
    if f.packed:
        q = unpack_int4(q, geometry.pack_axis, block[geometry.pack_axis]).astype(jnp.float32)
        q = q if f.zero else q - 8
    blocked = q.astype(jnp.float32).reshape(_blocked(geometry.shape, block))
    w = blocked * _expand(weight["scale"])
    if f.zero:
        w = w + _expand(weight["zero"])
    return w.reshape(geometry.shape).astype(dtype)


def dot(x: Float[Array, "... k"], weight: dict[str, Array], geometry: Geometry) -> Array:
    """x (its last axis the weight's flattened contraction axes) times a quantized weight without
    batch axes → [..., N] in x's dtype (see the module's doc for the two ways)."""
    f = geometry.format
    K = math.prod(geometry.shape[:geometry.contract])
    N = math.prod(geometry.shape[geometry.contract:])
    rows = x.reshape(-1, K)
    if f.activations is None:
        w = dequantize(weight, geometry, x.dtype).reshape(K, N)
        y = jnp.dot(rows, w, preferred_element_type=jnp.float32)
    else:
        y = _dynamic_dot(rows, weight["q"].reshape(K, N), weight["scale"].reshape(1, N), f)
    return y.astype(x.dtype).reshape(*x.shape[:-1], N)


def dot_transposed(x: Float[Array, "... k"], q: Array, scale: Array, f: Format) -> Float[Array, "... n"]:
    """x times the transpose of a weight stored [N, K] with a scale per row (a tied vocabulary head
    reading the embedding as stored), with a dynamic format's activations → f32 [..., N]."""
    rows = x.reshape(-1, x.shape[-1])
    y = _dynamic_dot(rows, q, scale.reshape(1, -1), f, transposed=True)
    return y.reshape(*x.shape[:-1], q.shape[0])


def _dynamic_dot(rows: Array, q: Array, w_scale: Array, f: Format, transposed: bool = False) -> Array:
    """Per-row activation scales, one low-precision matmul, both scales on the f32 result."""
    M = rows.shape[0]
    if M == 1:  # XLA:CPU's int8 matrix-vector product is a slow scalar loop; two rows take its GEMM
        rows = jnp.concatenate([rows, jnp.zeros_like(rows)])
    x32 = rows.astype(jnp.float32)
    x_scale = _row_scales(x32, f)
    scaled = x32 / x_scale
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    if f.activations == "int8":
        xq = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)
        acc = jax.lax.dot_general(xq, q, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    else:
        xq = scaled.astype(jnp.float8_e4m3fn)
        acc = jax.lax.dot_general(xq, q, dims, preferred_element_type=jnp.float32)
    return (acc * x_scale * w_scale)[:M]


def _row_scales(x32: Array, f: Format) -> Array:
    """Each row's activation scale: its largest magnitude maps to the format's largest value."""
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    return jnp.where(amax == 0, 1.0, amax / f.qmax)


def compiler_options(name: str | None, platform: str) -> dict[str, bool]:
    """What XLA is told beside a program whose weights are in format `name`. On GPUs, fp8 activations
    pin the matmuls to cuBLASLt's fp8 GEMM (`__cublas$lt$matmul$f8`, what TensorRT-LLM's Hopper fp8
    figures use): with Triton's GEMM fusion on, XLA gives fp8 dots to Triton whenever it cannot
    autotune (a deviceless build always; a device's autotuner may too)."""
    if platform == "gpu" and name is not None and get_format(name).activations == "float8_e4m3fn":
        return {"xla_gpu_enable_triton_gemm": False}
    return {}


def reference_activations(x: Array, f: Format) -> Array:
    """What a dynamic format's matmul sees of x: each row quantized with its own scale and
    dequantized (the f32 reference of `dot` for those formats)."""
    x32 = x.astype(jnp.float32)
    x_scale = _row_scales(x32, f)
    if f.activations == "int8":
        return jnp.clip(jnp.round(x32 / x_scale), -127, 127) * x_scale
    return (x32 / x_scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * x_scale
