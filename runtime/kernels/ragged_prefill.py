"""Ragged prefill flash attention in Pallas, over the paged cache, causal with an offset, on packed
tokens: the prompt chunks of R sequences lie one after another on one token axis, with no padding
between them.

Sequence r's chunk is the q_len[r] tokens from q_first[r] on; they sit at positions q_start[r] …
q_start[r] + q_len[r] − 1 (its earlier part already in the cache), and the query at position p sees
keys at positions [0, p] through page table r. The mask is aligned to each query's absolute
position, which is what chunked prefill and prefix caching need.

The wrapper cuts every chunk into blocks of block_q tokens (a chunk's last block may be short) and
lists them, sized for the worst case (⌈T / block_q⌉ + R; the unused ones are empty):

    block i:  sequence seq[i], tokens [tok[i], tok[i] + len[i]) of q, at positions pos[i] …

Grid (kv_head, block). A program loads block_q tokens × the G query heads of one kv head (G padded
to a power of two) as block_q·G rows, walks its sequence's pages up to its last query's position,
pages_per_block pages (one gathered tile of keys) at a time, with an online softmax, and stores its
len[i] tokens only: the rows past a short block belong to the next sequence, another program's.
Every token of a chunk is written by exactly one program; tokens in no chunk come out as zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from meshserve.runtime.kernels.tile import (
    check_pow2, check_scales, empty, exp_spec, fold, gather_tile, min_dot_rows, pow2_at_least, pow2_at_most,
    tile_positions, triton_params)


def _kernel(seq_ref, tok_ref, len_ref, pos_ref, tables_ref, q_ref, k_ref, v_ref, *refs, block_q: int,
            pages_per_block: int, page_size: int, sliding_window: int | None, interpret: bool, quantized: bool):
    exp_refs = refs[:2] if quantized else None  # a quantized pool's scales, then an aliased (poisoned) input
    o_ref = refs[-1]
    seq, tok, n, pos0 = seq_ref[0], tok_ref[0], len_ref[0], pos_ref[0]
    _, G, E = q_ref.shape  # [T + block_q, G, E]: this kv head's queries
    q = q_ref[pl.ds(tok, block_q)].reshape(block_q * G, E)  # rows t*G + g, input dtype; dots accumulate in f32
    scale = E ** -0.5
    tile = pages_per_block * page_size
    row_t = lax.broadcasted_iota(jnp.int32, (block_q * G, 1), 0) // G
    row_pos = pos0 + row_t  # [R, 1]
    last = jnp.where(n > 0, pl.cdiv(pos0 + n, tile), 0)  # an empty block reads nothing
    first = 0
    if sliding_window is not None:
        first = jnp.maximum(pos0 - sliding_window + 1, 0) // tile

    def body(j, carry):
        k, v = gather_tile(tables_ref, k_ref, v_ref, seq, j, pages_per_block, exp_refs, q.dtype)
        pos = tile_positions(j, tile)
        visible = pos <= row_pos
        if sliding_window is not None:
            visible &= pos > row_pos - sliding_window
        return fold(carry, q, k, v, visible, scale)

    m, l, acc = lax.fori_loop(first, last, body, empty(block_q * G, E))
    out = (acc / jnp.maximum(l, 1e-30)[:, None]).reshape(block_q, G, E).astype(o_ref.dtype)
    mine = jnp.broadcast_to(lax.broadcasted_iota(jnp.int32, (block_q, 1, 1), 0) < n, out.shape)
    if interpret:  # programs run one after another: a read-modify-write keeps the neighbours' rows
        here = o_ref.at[pl.ds(tok, block_q)]
        here[...] = jnp.where(mine, out, here[...])
    else:  # programs run at once: only a masked store leaves the next sequence's rows alone
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(o_ref.at[pl.ds(tok, block_q)], out, mask=mine)


def block_list(q_first: Int[Array, "r"], q_start: Int[Array, "r"], q_len: Int[Array, "r"], block_q: int,
               num_blocks: int):
    """(seq, tok, len, pos) of each of num_blocks blocks, i32[num_blocks] each: every chunk cut into
    blocks of block_q tokens, sequence after sequence; the list's tail is empty blocks (len 0)."""
    per_seq = pl.cdiv(q_len, block_q)  # [R]
    ends = jnp.cumsum(per_seq)
    i = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, i, side="right"), q_len.shape[0] - 1).astype(jnp.int32)
    j = i - (ends[seq] - per_seq[seq])  # the block's index in its sequence
    used = i < ends[-1]
    length = jnp.where(used, jnp.minimum(block_q, q_len[seq] - j * block_q), 0)
    return seq, q_first[seq] + j * block_q, length.astype(jnp.int32), q_start[seq] + j * block_q


@functools.partial(jax.jit, static_argnames=("block_q", "pages_per_block", "sliding_window", "interpret",
                                             "poison", "num_warps", "num_stages"))
def ragged_prefill(q: Float[Array, "t h e"], k_pages: Float[Array, "n s k e"], v_pages: Float[Array, "n s k e"],
                   page_tables: Int[Array, "r p"], q_first: Int[Array, "r"], q_start: Int[Array, "r"],
                   q_len: Int[Array, "r"], k_exp: Int[Array, "n s k"] | None = None,
                   v_exp: Int[Array, "n s k"] | None = None, *, block_q: int = 16, pages_per_block: int = 4,
                   sliding_window: int | None = None, interpret: bool = False, poison: bool = False,
                   num_warps: int | None = None, num_stages: int | None = None) -> Float[Array, "t h e"]:
    """Attention of packed prompt chunks (see the module docstring) over their sequences' pages.

    block_q and pages_per_block are rounded down to powers of two (Triton's arrays must have such
    sizes), block_q up to what fills a GPU dot's 16 rows. poison=True (tests) starts the output as
    NaN, so a token the kernel failed to write shows. num_warps, num_stages: Triton's settings. A
    quantized pool (int8/fp8 codes) comes with its scale exponents k_exp, v_exp (runtime/kv_quant.py)."""
    T, H, E = q.shape
    N, page_size, K, _ = k_pages.shape
    G, R, P = H // K, page_tables.shape[0], page_tables.shape[1]
    Gp = pow2_at_least(G)
    if not interpret:
        check_pow2(page_size=page_size, head_dim=E)
    block_q = min(pow2_at_most(block_q), pow2_at_least(T))
    if not interpret:
        block_q = max(block_q, min_dot_rows(Gp))
    ppb = min(pow2_at_most(pages_per_block), pow2_at_least(P))
    width = pl.cdiv(P, ppb) * ppb
    # Tables padded with the null page to whole tiles; the padding lies past every query: masked.
    tables = jnp.pad(page_tables.astype(jnp.int32), ((0, 0), (0, width - P)))
    num_blocks = pl.cdiv(T, block_q) + R
    meta = block_list(q_first.astype(jnp.int32), q_start.astype(jnp.int32), q_len.astype(jnp.int32), block_q,
                      num_blocks)
    # [K, T + block_q, Gp, E]: kv head major, a block's worth of padding tokens at the end (so every
    # block's load is in bounds), the G query heads of a kv head padded with zero heads to Gp.
    qg = jnp.pad(q.reshape(T, K, G, E), ((0, block_q), (0, 0), (0, Gp - G), (0, 0))).transpose(1, 0, 2, 3)
    out_shape = jax.ShapeDtypeStruct(qg.shape, q.dtype)
    heads = pl.BlockSpec((pl.squeezed, T + block_q, Gp, E), lambda h, i: (h, 0, 0, 0))
    per_block = pl.BlockSpec((1,), lambda h, i: (i,))
    in_specs = [per_block, per_block, per_block, per_block,
                pl.BlockSpec((R, width), lambda h, i: (0, 0)),
                heads,
                # the pool, viewed as kv head h's [N, page_size, E]; pages are gathered by table
                pl.BlockSpec((N, page_size, pl.squeezed, E), lambda h, i: (0, 0, h, 0)),
                pl.BlockSpec((N, page_size, pl.squeezed, E), lambda h, i: (0, 0, h, 0))]
    args = [*meta, tables, qg, k_pages, v_pages]
    quantized = check_scales(k_pages, k_exp, v_exp)
    if quantized:
        args += [k_exp, v_exp]
        in_specs += [exp_spec(N, page_size, lambda h, i: (0, 0, h))] * 2
    aliases = {}
    if poison:
        args.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs.append(heads)
        aliases = {len(args) - 1: 0}
    out = pl.pallas_call(
        functools.partial(_kernel, block_q=block_q, pages_per_block=ppb, page_size=page_size,
                          sliding_window=sliding_window, interpret=interpret, quantized=quantized),
        out_shape=out_shape, grid=(K, num_blocks), in_specs=in_specs, out_specs=heads,
        input_output_aliases=aliases, interpret=interpret, name="ragged_prefill",
        compiler_params=triton_params(num_warps, num_stages, interpret))(*args)
    out = out[:, :T, :G].transpose(1, 0, 2, 3).reshape(T, H, E)
    t = jnp.arange(T, dtype=jnp.int32)[:, None]
    in_chunk = jnp.any((t >= q_first[None]) & (t < (q_first + q_len)[None]), axis=1)  # [T]
    return jnp.where(in_chunk[:, None, None], out, 0)
