"""The step both attention kernels repeat per tile of keys: gather the tile's pages, score it, and
fold it into the online softmax (running max m, running sum l, unnormalised accumulator acc); and
the sizes the kernels pick their tiles by.

Triton's Pallas lowering needs every array inside a kernel to have a power-of-two size, and a GPU
dot at least 16 rows: the kernels choose their tiles with these, whatever the caller asked for.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from meshserve.runtime import kv_quant

MASK = -1e30  # finite: a fully masked tile gives exp(0) weights that a later valid tile erases


def pow2_at_most(n: int) -> int:
    """The largest power of two <= n (1 for n < 1)."""
    return 1 << (max(1, n).bit_length() - 1)


def pow2_at_least(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def min_dot_rows(heads: int) -> int:
    """The fewest tokens whose rows (× heads query heads each) fill a GPU dot's 16 rows."""
    return max(1, 16 // heads)


def check_pow2(**sizes: int) -> None:
    """Sizes the kernels cannot tile around (the pool's layout) must be powers of two on a GPU."""
    for name, n in sizes.items():
        if n & (n - 1):
            raise ValueError(f"the Pallas GPU kernels need a power-of-two {name}, got {n}: use attention: reference")


def gather_tile(tables_ref, k_ref, v_ref, row, j, pages_per_block: int, exp_refs=None, dtype=None):
    """Keys and values [tile, E] of tile j of page table `row`: pages_per_block pages of this kv
    head (a power of two). A quantized pool's codes come with exp_refs, this kv head's scale
    exponents [N, page_size]: the tile is dequantized to `dtype` (runtime/kv_quant.py)."""
    pages = tables_ref[row, pl.ds(j * pages_per_block, pages_per_block)]
    tile = pages_per_block * k_ref.shape[1]
    k, v = k_ref[pages].reshape(tile, -1), v_ref[pages].reshape(tile, -1)
    if exp_refs is None:
        return k, v
    k_exp, v_exp = (r[pages].reshape(tile) for r in exp_refs)
    return kv_quant.dequantize(k, k_exp, dtype), kv_quant.dequantize(v, v_exp, dtype)


def check_scales(k_pages, k_exp, v_exp) -> bool:
    """Whether a kernel reads a quantized pool: both scale arrays given, int8 [N, page_size, K] like
    the pages (ValueError otherwise), or neither."""
    if k_exp is None and v_exp is None:
        return False
    for name, a in (("k_exp", k_exp), ("v_exp", v_exp)):
        if a is None or tuple(a.shape) != tuple(k_pages.shape[:3]) or a.dtype != jnp.int8:
            raise ValueError(f"{name} must be int8 {list(k_pages.shape[:3])} beside the pages, got "
                             f"{None if a is None else f'{a.dtype}{list(a.shape)}'}")
    return True


def exp_spec(pages: int, page_size: int, index_map):
    """The BlockSpec of a quantized pool's scale exponents [N, page_size, K], viewed as one kv
    head's [N, page_size] (index_map gives the head as its last block index)."""
    return pl.BlockSpec((pages, page_size, pl.squeezed), index_map)


def tile_positions(j, tile: int):
    """i32[1, tile]: the key positions tile j covers."""
    return j * tile + lax.broadcasted_iota(jnp.int32, (1, tile), 1)


# Float32 operands are multiplied as float32 (Triton's default for them is TF32, ~3e-4 relative
# error); bfloat16 operands are unaffected.
_PRECISION = lax.Precision.HIGHEST


def fold(carry, q, k, v, visible, scale: float):
    """One online-softmax step over keys k / values v for queries q (rows), masked by `visible`."""
    m, l, acc = carry
    scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=_PRECISION) * scale  # [R, tile]
    scores = jnp.where(visible, scores, MASK)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[:, None])
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=_PRECISION)
    return m_new, l * correction + p.sum(axis=-1), acc * correction[:, None] + pv


def empty(rows: int, head_dim: int):
    return (jnp.full((rows,), MASK, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def triton_params(num_warps: int | None, num_stages: int | None, interpret: bool):
    """The Triton lowering's launch settings (None: its defaults; nothing when interpreted). Always
    given on a GPU: without them jax 0.10 lowers a pallas_call with Mosaic GPU instead of Triton."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
