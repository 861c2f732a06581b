"""Ragged prefill flash attention in Pallas, over the paged cache, causal with an offset.

Row b holds q_len[b] queries at positions q_start[b] … q_start[b] + q_len[b] − 1 (a prompt chunk,
its earlier part already in the cache); query at position p sees keys at positions [0, p]. The mask
is aligned to each query's absolute position, not to the top-left of the block, which is what
chunked prefill and prefix caching need.

Grid (batch, kv_head, query block). A program takes block_q queries × the G query heads of one kv
head as block_q·G rows, walks the sequence's pages up to its last query's position, pages_per_block
pages (one gathered tile of keys) at a time, with an online softmax, and writes normalised rows
(padding rows, t >= q_len, are written as zeros).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from meshserve.runtime.kernels.tile import empty, fold, gather_tile, tile_positions, triton_params



def _kernel(tables_ref, start_ref, len_ref, q_ref, k_ref, v_ref, *refs, block_q: int, pages_per_block: int,
            page_size: int, sliding_window: int | None):
    o_ref = refs[-1]  # an aliased (poisoned) input comes first
    i = pl.program_id(2)
    start, n = start_ref[0], len_ref[0]
    _, _, _, G, E = q_ref.shape
    q = q_ref[0, :, 0].reshape(block_q * G, E)  # rows t*G + g, input dtype; dots accumulate in f32
    scale = E ** -0.5
    tile = pages_per_block * page_size
    row_t = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q * G, 1), 0) // G
    row_pos = start + row_t  # [R, 1]
    end = start + jnp.minimum((i + 1) * block_q, n)  # one past the last position any valid row sees
    last = jnp.where(i * block_q < n, pl.cdiv(end, tile), 0)  # a block of padding rows reads nothing
    first = 0
    if sliding_window is not None:
        first = jnp.maximum(start + i * block_q - sliding_window + 1, 0) // tile

    def body(j, carry):
        k, v = gather_tile(tables_ref, k_ref, v_ref, j, pages_per_block)
        pos = tile_positions(j, tile)
        visible = pos <= row_pos
        if sliding_window is not None:
            visible &= pos > row_pos - sliding_window
        return fold(carry, q, k, v, visible, scale)

    m, l, acc = lax.fori_loop(first, last, body, empty(block_q * G, E))
    out = jnp.where(row_t < n, acc / jnp.maximum(l, 1e-30)[:, None], 0.0)
    o_ref[0, :, 0] = out.reshape(block_q, G, E).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "pages_per_block", "sliding_window", "interpret",
                                             "poison", "num_warps", "num_stages"))
def ragged_prefill(q: Float[Array, "b t h e"], k_pages: Float[Array, "n s k e"], v_pages: Float[Array, "n s k e"],
                   page_tables: Int[Array, "b p"], q_start: Int[Array, "b"], q_len: Int[Array, "b"], *,
                   block_q: int = 16, pages_per_block: int = 4, sliding_window: int | None = None,
                   interpret: bool = False, poison: bool = False, num_warps: int | None = None,
                   num_stages: int | None = None) -> Float[Array, "b t h e"]:
    B, T, H, E = q.shape
    N, page_size, K, _ = k_pages.shape
    G, P = H // K, page_tables.shape[1]
    block_q = min(block_q, T)
    Tp = pl.cdiv(T, block_q) * block_q
    ppb = max(1, min(pages_per_block, P))
    width = pl.cdiv(P, ppb) * ppb
    # Tables padded with the null page to whole tiles; the padding lies past every query: masked.
    tables = jnp.pad(page_tables.astype(jnp.int32), ((0, 0), (0, width - P)))
    qg = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, Tp, K, G, E)
    out_shape = jax.ShapeDtypeStruct((B, Tp, K, G, E), q.dtype)
    out_spec = pl.BlockSpec((1, block_q, 1, G, E), lambda b, h, i: (b, i, h, 0, 0))
    in_specs = [
        pl.BlockSpec((1, width), lambda b, h, i: (b, 0)),
        pl.BlockSpec((1,), lambda b, h, i: (b,)),
        pl.BlockSpec((1,), lambda b, h, i: (b,)),
        pl.BlockSpec((1, block_q, 1, G, E), lambda b, h, i: (b, i, h, 0, 0)),
        # the pool, viewed as kv head h's [N, page_size, E]; pages are gathered by table
        pl.BlockSpec((N, page_size, pl.squeezed, E), lambda b, h, i: (0, 0, h, 0)),
        pl.BlockSpec((N, page_size, pl.squeezed, E), lambda b, h, i: (0, 0, h, 0)),
    ]
    args = [tables, q_start.astype(jnp.int32), q_len.astype(jnp.int32), qg,
            k_pages, v_pages]
    aliases = {}
    if poison:
        args.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs.append(out_spec)
        aliases = {6: 0}
    out = pl.pallas_call(
        functools.partial(_kernel, block_q=block_q, pages_per_block=ppb, page_size=page_size,
                          sliding_window=sliding_window),
        out_shape=out_shape, grid=(B, K, Tp // block_q), in_specs=in_specs, out_specs=out_spec,
        input_output_aliases=aliases, interpret=interpret, name="ragged_prefill",
        compiler_params=triton_params(num_warps, num_stages, interpret))(*args)
    return out.reshape(B, Tp, H, E)[:, :T]
