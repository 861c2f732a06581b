"""Paged decode attention in Pallas: one query token per sequence, GQA, page tables into the shared
pool, split-K over long contexts with an exact combine.

Grid (batch, kv_head, split). Each program takes the G query heads that share one kv head, walks its
split's pages of that sequence `pages_per_block` pages at a time (one gathered tile of keys) with an
online softmax, and writes unnormalised partials (acc, running max m, running sum l). The splits are
combined outside the kernel:

    out = Σ_s exp(m_s − M) acc_s / Σ_s exp(m_s − M) l_s,   M = max_s m_s

which is exact (empty splits have m = MASK, l = 0 and drop out).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from meshserve.runtime.kernels.tile import (
    check_pow2, check_scales, empty, exp_spec, fold, gather_tile, pow2_at_least, pow2_at_most, tile_positions,
    triton_params)


def _kernel(tables_ref, lengths_ref, q_ref, k_ref, v_ref, *refs, blocks_per_split: int, pages_per_block: int,
            page_size: int, sliding_window: int | None, quantized: bool):
    exp_refs = refs[:2] if quantized else None  # a quantized pool's scales, then any aliased (poisoned) inputs
    o_ref, m_ref, l_ref = refs[-3:]
    s = pl.program_id(2)
    length = lengths_ref[0]
    q = q_ref[0, 0]  # [G, E], in the input dtype: dots accumulate in f32
    scale = q_ref.shape[-1] ** -0.5
    tile = pages_per_block * page_size
    first = s * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(length, tile))
    if sliding_window is not None:  # tiles wholly older than the window are skipped
        first = jnp.maximum(first, jnp.maximum(length - sliding_window, 0) // tile)

    def body(j, carry):
        k, v = gather_tile(tables_ref, k_ref, v_ref, 0, j, pages_per_block, exp_refs, q.dtype)
        pos = tile_positions(j, tile)
        visible = pos < length
        if sliding_window is not None:
            visible &= pos > length - 1 - sliding_window
        return fold(carry, q, k, v, visible, scale)

    m, l, acc = lax.fori_loop(first, last, body, empty(*q.shape))
    o_ref[0, 0, 0] = acc
    m_ref[0, 0, 0] = m
    l_ref[0, 0, 0] = l


@functools.partial(jax.jit, static_argnames=("num_splits", "pages_per_block", "sliding_window", "interpret",
                                             "poison", "num_warps", "num_stages"))
def paged_decode(q: Float[Array, "b h e"], k_pages: Float[Array, "n s k e"], v_pages: Float[Array, "n s k e"],
                 page_tables: Int[Array, "b p"], lengths: Int[Array, "b"], k_exp: Int[Array, "n s k"] | None = None,
                 v_exp: Int[Array, "n s k"] | None = None, *, num_splits: int = 1,
                 pages_per_block: int = 4, sliding_window: int | None = None, interpret: bool = False,
                 poison: bool = False, num_warps: int | None = None,
                 num_stages: int | None = None) -> Float[Array, "b h e"]:
    """Attention of q (at position lengths[b] − 1) over each sequence's first lengths[b] keys.

    num_splits > 1 spreads a long context over more programs (split-K). pages_per_block is rounded
    down to a power of two (Triton's arrays must have such sizes). poison=True (tests) starts the
    kernel's outputs as NaN, so an element the kernel failed to write shows. num_warps and
    num_stages: Triton's launch settings (None: its defaults). A quantized pool (int8/fp8 codes)
    comes with its scale exponents k_exp, v_exp (runtime/kv_quant.py).
    """
    B, H, E = q.shape
    N, page_size, K, _ = k_pages.shape
    G, P = H // K, page_tables.shape[1]
    if not interpret:
        check_pow2(page_size=page_size, head_dim=E)
    # GPU dots need at least 16 rows: the G query heads of a kv head are padded with zero rows.
    Gp = max(16, pow2_at_least(G))
    qg = jnp.pad(q.reshape(B, K, G, E), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    ppb = min(pow2_at_most(pages_per_block), pow2_at_least(P))
    blocks = pl.cdiv(P, ppb)
    S = max(1, min(num_splits, blocks))
    blocks_per_split = pl.cdiv(blocks, S)
    # Tables padded with the null page to whole tiles; the padding lies past every length: masked.
    tables = jnp.pad(page_tables.astype(jnp.int32), ((0, 0), (0, blocks * ppb - P)))
    partial_shapes = (jax.ShapeDtypeStruct((B, K, S, Gp, E), jnp.float32),
                      jax.ShapeDtypeStruct((B, K, S, Gp), jnp.float32),
                      jax.ShapeDtypeStruct((B, K, S, Gp), jnp.float32))
    partial_specs = (pl.BlockSpec((1, 1, 1, Gp, E), lambda b, h, s: (b, h, s, 0, 0)),
                     pl.BlockSpec((1, 1, 1, Gp), lambda b, h, s: (b, h, s, 0)),
                     pl.BlockSpec((1, 1, 1, Gp), lambda b, h, s: (b, h, s, 0)))
    in_specs = [
        pl.BlockSpec((1, blocks * ppb), lambda b, h, s: (b, 0)),  # this sequence's page table
        pl.BlockSpec((1,), lambda b, h, s: (b,)),  # its length
        pl.BlockSpec((1, 1, Gp, E), lambda b, h, s: (b, h, 0, 0)),  # the G query heads of kv head h
        # the pool, viewed as kv head h's [N, page_size, E]; pages are gathered by table
        pl.BlockSpec((N, page_size, pl.squeezed, E), lambda b, h, s: (0, 0, h, 0)),
        pl.BlockSpec((N, page_size, pl.squeezed, E), lambda b, h, s: (0, 0, h, 0)),
    ]
    args = [tables, lengths.astype(jnp.int32), qg, k_pages, v_pages]
    quantized = check_scales(k_pages, k_exp, v_exp)
    if quantized:
        args += [k_exp, v_exp]
        in_specs += [exp_spec(N, page_size, lambda b, h, s: (0, 0, h))] * 2
    aliases = {}
    if poison:
        first = len(args)
        args += [jnp.full(s.shape, jnp.nan, s.dtype) for s in partial_shapes]
        in_specs += list(partial_specs)
        aliases = {first: 0, first + 1: 1, first + 2: 2}
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, blocks_per_split=blocks_per_split, pages_per_block=ppb,
                          page_size=page_size, sliding_window=sliding_window, quantized=quantized),
        out_shape=partial_shapes, grid=(B, K, S), in_specs=in_specs, out_specs=partial_specs,
        input_output_aliases=aliases, interpret=interpret, name="paged_decode",
        compiler_params=triton_params(num_warps, num_stages, interpret))(*args)
    top = m.max(axis=2, keepdims=True)
    w = jnp.exp(m - top)  # [B, K, S, G]
    out = (o * w[..., None]).sum(axis=2) / (l * w).sum(axis=2)[..., None]  # [B, K, Gp, E]
    return out[:, :, :G].reshape(B, H, E).astype(q.dtype)
