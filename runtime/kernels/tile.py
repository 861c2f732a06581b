"""The step both attention kernels repeat per tile of keys: gather the tile's pages, score it, and
fold it into the online softmax (running max m, running sum l, unnormalised accumulator acc)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MASK = -1e30  # finite: a fully masked tile gives exp(0) weights that a later valid tile erases


def gather_tile(tables_ref, k_ref, v_ref, j, pages_per_block: int):
    """Keys and values [tile, E] of tile j: pages_per_block pages of this kv head, by page table."""
    pages = tables_ref[0, pl.ds(j * pages_per_block, pages_per_block)]
    tile = pages_per_block * k_ref.shape[1]
    return k_ref[pages].reshape(tile, -1), v_ref[pages].reshape(tile, -1)


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
    """The Triton lowering's launch settings (None: its defaults; nothing when interpreted)."""
    if interpret or (num_warps is None and num_stages is None):
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
