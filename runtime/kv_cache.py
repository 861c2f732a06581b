"""The paged KV cache: one pool of fixed-size pages per layer, shared by every running request.

    pool.k[layer], pool.v[layer]: [num_pages, page_size, kv_heads, head_dim]
    pool.k_exp[layer], …:          [num_pages, page_size, kv_heads]   an int8 / fp8 pool's scales

    page table of a request (i32[P]):  [ 7, 2, 9, 0, 0 ]   → positions 0..15 in page 7, 16..31 in
                                                             page 2, 32..47 in page 9; 0 = unused
Page-major with tokens inside a page contiguous: a page is one contiguous block per layer, so
moving a page (offload, prefix sharing) is one slice, and gathering a request's pages is one take.
Page 0 is the null page: never allocated, it absorbs the writes of padding tokens, and page-table
slots past a request's length point at it (they are masked by position, never read as data).

An int8 / fp8 pool (engine.kv_cache_dtype) quantizes each token's key and value per kv head as it
is written, with its own scale (runtime/kv_quant.py); attention dequantizes a tile as it reads it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float, Int

from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConfigError
from meshserve.runtime import kv_quant
from meshserve.runtime.block_manager import NULL_PAGE  # noqa: F401  (the page padding writes go to)
from meshserve.runtime.target import CPU, Target


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    k: tuple[Array, ...]  # per layer [N, page_size, K, E] in the cache dtype (int8/fp8: codes)
    v: tuple[Array, ...]
    # a quantized pool's scales, per layer [N, page_size, K] int8: each token's key (value) of each
    # kv head is k · 2^(k_exp/4) (runtime/kv_quant.py); () for a float pool
    k_exp: tuple[Array, ...] = ()
    v_exp: tuple[Array, ...] = ()

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def quantized(self) -> bool:
        return bool(self.k_exp)

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page across every layer, keys then values: [2·layers, page_size, kv_heads, head_dim]
        (how pages leave the pool: offload, store, transfer). A quantized page carries each token's
        scale exponent after its codes: head_dim + 1 bytes (`page_dtype` uint8)."""
        *shape, head_dim = self.k[0].shape[1:]
        return (2 * len(self.k), *shape, head_dim + 1 if self.quantized else head_dim)

    @property
    def dtype(self):
        """The cache's element type: the model's, or int8 / float8_e4m3fn codes."""
        return self.k[0].dtype

    @property
    def page_dtype(self):
        """The element type of a page leaving the pool (`page_shape`)."""
        return jnp.dtype(jnp.uint8) if self.quantized else self.dtype

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v + self.k_exp + self.v_exp)

    def layer(self, i: int) -> tuple[Array, ...]:
        """Layer i's arrays as attention reads them: (k, v), or (k, v, k_exp, v_exp) when quantized."""
        return (self.k[i], self.v[i], self.k_exp[i], self.v_exp[i]) if self.quantized else (self.k[i], self.v[i])

    def write(self, i: int, pages, slots, k, v) -> "KVPool":
        """New tokens' keys and values [..., K, E] into their (page, slot)s of layer i, quantized
        as they are written in a quantized pool."""
        put = lambda arrays, x: _replace(arrays, i, arrays[i].at[pages, slots].set(x))
        if not self.quantized:
            return KVPool(put(self.k, k.astype(self.dtype)), put(self.v, v.astype(self.dtype)))
        (kc, ke), (vc, ve) = kv_quant.quantize(k, self.dtype), kv_quant.quantize(v, self.dtype)
        return KVPool(put(self.k, kc), put(self.v, vc), put(self.k_exp, ke), put(self.v_exp, ve))


def page_bytes(config: ModelConfig, page_size: int, dtype) -> int:
    """Bytes one page takes across all layers, keys and values (a quantized cache's scales included)."""
    return 2 * config.num_layers * page_size * config.num_kv_heads * kv_quant.token_bytes(dtype, config.head_dim)


def pool_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (num_pages, page_size, config.num_kv_heads, config.head_dim)


def abstract_pool(config: ModelConfig, num_pages: int, page_size: int, dtype) -> KVPool:
    shape = pool_shape(config, num_pages, page_size)
    codes = (jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)),) * config.num_layers
    if not kv_quant.is_quantized(dtype):
        return KVPool(codes, codes)
    exps = (jax.ShapeDtypeStruct(shape[:-1], jnp.int8),) * config.num_layers
    return KVPool(codes, codes, exps, exps)


def zeros_pool(config: ModelConfig, num_pages: int, page_size: int, dtype) -> KVPool:
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_pool(config, num_pages, page_size, dtype))


def sharded_zeros_pool(config: ModelConfig, num_pages: int, page_size: int, dtype, layout) -> KVPool:
    """A zero pool created in place on the layout's devices (never whole on one device first)."""
    abstract = abstract_pool(config, num_pages, page_size, dtype)
    makers = {}  # one small program per kind of array, not per layer

    def zeros(a, sharding):
        key = (a.shape, a.dtype, sharding)
        if key not in makers:
            makers[key] = jax.jit(functools.partial(jnp.zeros, a.shape, a.dtype), out_shardings=sharding)
        return makers[key]()

    return jax.tree.map(zeros, abstract, pool_shardings(layout, abstract))


def pool_shardings(layout, pool: KVPool) -> KVPool:
    """Each pool array's sharding under the layout's rules (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda a: layout.sharding(POOL_AXES[:a.ndim], a.shape), pool)


POOL_AXES = ("pages", "page_slots", "kv_heads", "head_dim")  # logical axes of a pool array


@dataclasses.dataclass(frozen=True)
class AttentionShards:
    """How one compiled program's attention is split over the mesh (static; None = not split).

    Attention runs per shard through shard_map: each tensor shard takes its q heads and their kv
    heads, each data shard its batch rows and its range of pages (page ids made local). When kv heads
    are replicated but q heads split (kv_heads < tensor size), a shard takes the one kv head its q
    heads share. A batch that is not split over data (a prefill of one request) runs on every data
    shard; the shard owning the request's pages supplies the result.
    """

    mesh: Mesh
    batch: str | None
    pages: str | None
    q_heads: str | None
    kv_heads: str | None

    def specs(self):
        rows = P(self.batch)
        return (P(self.batch, None, self.q_heads, None), P(self.pages, None, self.kv_heads, None),
                P(self.batch, None), rows)

    def layer_specs(self, quantized: bool) -> tuple:
        """The specs of KVPool.layer's arrays: codes, and scales split like them."""
        codes, exps = P(self.pages, None, self.kv_heads, None), P(self.pages, None, self.kv_heads)
        return (codes, codes, exps, exps) if quantized else (codes, codes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """The pool plus this call's metadata; implements models.decoder.KVCache.

    page_tables:  i32[B, P]  the pages of each row's sequence, in order
    write_pages:  i32[B, T]  where each new token's K/V goes (NULL_PAGE for padding)
    write_slots:  i32[B, T]  the offset inside that page
    query_lens:   i32[B]     real (non-padding) tokens of each row; they sit at positions[b, 0] + t
    attention:    "reference" (gather the pages, dense jnp attention) or "pallas" (runtime/kernels)
    shards:       how attention splits over the mesh; None on one device
    target:       what the program is built for (the Pallas kernels run interpreted off a GPU)
    """

    pool: KVPool
    page_tables: Int[Array, "b p"]
    write_pages: Int[Array, "b t"]
    write_slots: Int[Array, "b t"]
    query_lens: Int[Array, "b"]
    attention: str = dataclasses.field(default="reference", metadata=dict(static=True))
    shards: AttentionShards | None = dataclasses.field(default=None, metadata=dict(static=True))
    target: Target = dataclasses.field(default=CPU, metadata=dict(static=True))

    def attend(self, layer, q, k, v, positions, sliding_window):
        pool = self.pool.write(layer, self.write_pages, self.write_slots, k, v)
        fn = functools.partial(_attend_local, attention=self.attention, sliding_window=sliding_window,
                               shards=self.shards, interpret=self.target.interpret)
        args = (q, pool.layer(layer), self.page_tables, positions[:, 0], self.query_lens)
        if self.shards is None:
            out = fn(*args)
        else:
            q_spec, _, table_spec, row_spec = self.shards.specs()
            out = jax.shard_map(fn, mesh=self.shards.mesh, check_vma=False,
                                in_specs=(q_spec, self.shards.layer_specs(pool.quantized), table_spec, row_spec,
                                          row_spec), out_specs=q_spec)(*args)
        return out, dataclasses.replace(self, pool=pool)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedKVCache:
    """The pool plus a ragged prefill call's metadata: the prompt chunks of R rows flattened into one
    token axis (queries [1, T]), and the pages of their contexts flattened into one page list.

        token_row:  i32[T]  the row of each token (-1: padding); a row's tokens are contiguous
        ctx_pages:  i32[Q]  each row's pages up to its chunk's end, row after row (NULL_PAGE: padding)
        ctx_row:    i32[Q]  the row each of those pages belongs to (-1: padding)
        ctx_index:  i32[Q]  its index in that row's page table (page i holds positions i·ps …)

    A query sees the keys of its own row at positions <= its own. Both paths keep the tokens packed:
    the reference one scores each token against the whole flattened context at once, the Pallas
    kernel walks each row's own pages, so the cost follows the real context of the call, not rows ×
    the longest context. `rows` (static) is R, the page tables the kernel is given.
    """

    pool: KVPool
    write_pages: Int[Array, "1 t"]
    write_slots: Int[Array, "1 t"]
    token_row: Int[Array, "t"]
    ctx_pages: Int[Array, "q"]
    ctx_row: Int[Array, "q"]
    ctx_index: Int[Array, "q"]
    rows: int = dataclasses.field(default=1, metadata=dict(static=True))
    attention: str = dataclasses.field(default="reference", metadata=dict(static=True))
    shards: AttentionShards | None = dataclasses.field(default=None, metadata=dict(static=True))
    target: Target = dataclasses.field(default=CPU, metadata=dict(static=True))

    def attend(self, layer, q, k, v, positions, sliding_window):
        pool = self.pool.write(layer, self.write_pages, self.write_slots, k, v)
        fn = functools.partial(_ragged_local, rows=self.rows, attention=self.attention,
                               sliding_window=sliding_window, shards=self.shards, interpret=self.target.interpret)
        args = (q[0], pool.layer(layer), self.ctx_pages, self.ctx_row, self.ctx_index, self.token_row, positions[0])
        if self.shards is None:
            out = fn(*args)
        else:
            q_spec = self.shards.specs()[0]
            flat = P(None, q_spec[2], None)  # [T, H, E]: heads split over tensor, tokens not split
            out = jax.shard_map(fn, mesh=self.shards.mesh, check_vma=False,
                                in_specs=(flat, self.shards.layer_specs(pool.quantized), P(), P(), P(), P(), P()),
                                out_specs=flat)(*args)
        return out[None], dataclasses.replace(self, pool=pool)


def _local_pages(pages, n_local: int, shards: AttentionShards | None):
    """Page ids as this data shard's (its range of the pool made local; others point at its null
    page), and which of them it owns (None when pages are not split)."""
    if shards is None or shards.pages is None:
        return pages, None
    local = pages - lax.axis_index(shards.pages) * n_local
    owned = (local >= 0) & (local < n_local)
    return jnp.where(owned, local, 0), owned


def _shared_kv_head(q_heads: int, kv_heads: int, shards: AttentionShards | None):
    """With kv heads replicated and q heads split, the one kv head this shard's q heads share
    (else None)."""
    if shards is None or shards.q_heads is None or shards.kv_heads is not None:
        return None
    group = q_heads * shards.mesh.shape[shards.q_heads] // kv_heads
    return lax.axis_index(shards.q_heads) * q_heads // group


def _ragged_local(q, kv, ctx_pages, ctx_row, ctx_index, token_row, positions, *, rows: int,
                  attention: str, sliding_window: int | None, shards: AttentionShards | None, interpret: bool):
    """Ragged prefill attention of one shard (or of everything, on one device): q [T, H, E], kv a
    layer's arrays (KVPool.layer)."""
    pages_used = jnp.sum(ctx_row >= 0)  # a call's pages come first, padding after
    ctx_pages, owned = _local_pages(ctx_pages, kv[0].shape[0], shards)
    if owned is not None:
        ctx_row = jnp.where(owned, ctx_row, -1)  # another shard's pages: no row of this shard's
    kv_first = _shared_kv_head(q.shape[1], kv[0].shape[2], shards)
    if attention == "pallas":
        if kv_first is not None:
            raise ConfigError("attention: pallas needs kv heads split like q heads; use reference")
        out = _ragged_pallas(q, kv, ctx_pages, ctx_row, token_row, positions, rows, sliding_window, interpret)
    else:
        out = _ragged_tiled(q, kv, ctx_pages, ctx_row, ctx_index, token_row, positions, pages_used,
                            sliding_window, kv_first)
    if owned is not None:
        # a row's pages all live on one data shard: that shard's result is the token's
        mine = jnp.any(token_row[:, None] == jnp.where(owned, ctx_row, -2)[None], axis=1)
        out = lax.psum(jnp.where(mine[:, None, None], out, jnp.zeros_like(out)), shards.pages)
    return out


# The jnp attention ("reference"): an online softmax over tiles of keys, looping only over the
# tiles that hold a real key (a dynamic trip count), so its cost follows the real context lengths,
# not the width of the page tables: no context buckets are needed for it. A decode tile is
# gathered for every row, so it is smaller: a row reads at most a tile it does not need.
TILE_KEYS = 256
DECODE_TILE_KEYS = 64


def _fold(carry, scores, visible, values, spec: str):
    """One online-softmax step: scores [..., s] (f32, scaled), masked by `visible`."""
    m, l, acc = carry
    scores = jnp.where(visible, scores, _MASKED)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[..., None])
    pv = jnp.einsum(spec, p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv


def _gather(kv, pages, dtype):
    """Keys and values of `pages` ([..., page_size, K, E] each), dequantized to `dtype` from a
    quantized layer (runtime/kv_quant.py)."""
    if len(kv) == 2:
        return kv[0][pages], kv[1][pages]
    k, v, k_exp, v_exp = kv
    return kv_quant.dequantize(k[pages], k_exp[pages], dtype), kv_quant.dequantize(v[pages], v_exp[pages], dtype)


def _empty(shape, head_dim: int):
    return (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))


def _pad_to(x, multiple: int, axis: int, value):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _decode_tiled(q, kv, tables, owned, start, sliding_window, kv_first):
    """q [B, T, H, E]: row b's T queries at positions start[b] + t over its pages (tables [B, P]),
    each seeing the keys up to its own position (T = 1: decode; T > 1: a speculative step's
    verification of its drafts)."""
    B, T, H, E = q.shape
    ps = kv[0].shape[1]
    tp = max(1, min(DECODE_TILE_KEYS // ps, tables.shape[1]))  # pages per tile
    tile = tp * ps
    tables = _pad_to(tables, tp, 1, 0)
    if owned is not None:
        owned = _pad_to(owned, tp, 1, False)
    K = 1 if kv_first is not None else kv[0].shape[2]
    qg = q.reshape(B, T, K, H // K, E)
    scale = E ** -0.5
    query_pos = start[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    first = 0
    if sliding_window is not None:
        first = jnp.maximum(jnp.min(start) - sliding_window + 1, 0) // tile
    last = (jnp.max(start) + T - 1) // tile + 1

    def body(j, carry):
        pages = lax.dynamic_slice_in_dim(tables, j * tp, tp, axis=1)  # [B, tp]
        keys, values = (x.reshape(B, tile, *x.shape[3:]) for x in _gather(kv, pages, q.dtype))
        if kv_first is not None:
            keys = lax.dynamic_slice_in_dim(keys, kv_first, 1, axis=2)
            values = lax.dynamic_slice_in_dim(values, kv_first, 1, axis=2)
        scores = jnp.einsum("btkge,bske->btkgs", qg, keys, preferred_element_type=jnp.float32) * scale
        pos = j * tile + jnp.arange(tile, dtype=jnp.int32)
        visible = pos[None, None] <= query_pos[..., None]  # [B, T, tile]
        if sliding_window is not None:
            visible &= pos[None, None] > query_pos[..., None] - sliding_window
        if owned is not None:
            visible &= jnp.repeat(lax.dynamic_slice_in_dim(owned, j * tp, tp, axis=1), ps, axis=1)[:, None]
        return _fold(carry, scores, visible[:, :, None, None], values, "btkgs,bske->btkge")

    m, l, acc = lax.fori_loop(first, last, body, _empty((B, T, K, H // K), E))
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.reshape(B, T, H, E).astype(q.dtype)


def _ragged_tiled(q, kv, ctx_pages, ctx_row, ctx_index, token_row, positions, pages_used, sliding_window,
                  kv_first):
    """q [T, H, E]: every token over the call's flattened context (ctx_*, the first `pages_used`
    pages real), masked to its own row and to positions <= its own. Per kv head, the G query heads
    sharing it and the T tokens form the rows of one plain matmul ([K, G·T, E] · [K, E, tile]):
    XLA:CPU runs that ~1.5× faster than the equivalent einsum over [T, K, G, E]."""
    T, H, E = q.shape
    ps = kv[0].shape[1]
    tp = max(1, min(TILE_KEYS // ps, ctx_pages.shape[0]))
    tile = tp * ps
    ctx_pages = _pad_to(ctx_pages, tp, 0, 0)
    ctx_row = _pad_to(ctx_row, tp, 0, -1)
    ctx_index = _pad_to(ctx_index, tp, 0, 0)
    K = 1 if kv_first is not None else kv[0].shape[2]
    G = H // K
    qk = (q.reshape(T, K, G, E).transpose(1, 2, 0, 3).reshape(K, G * T, E) * (E ** -0.5)).astype(q.dtype)
    row_of = jnp.tile(token_row, G)  # of each of the G·T rows
    pos_of = jnp.tile(positions, G)

    def body(j, carry):
        pages = lax.dynamic_slice_in_dim(ctx_pages, j * tp, tp)
        keys, values = (x.reshape(tile, *x.shape[2:]) for x in _gather(kv, pages, q.dtype))  # [tile, K, E]
        if kv_first is not None:
            keys = lax.dynamic_slice_in_dim(keys, kv_first, 1, axis=1)
            values = lax.dynamic_slice_in_dim(values, kv_first, 1, axis=1)
        scores = jnp.matmul(qk, keys.transpose(1, 2, 0), preferred_element_type=jnp.float32)  # [K, G·T, tile]
        key_row = jnp.repeat(lax.dynamic_slice_in_dim(ctx_row, j * tp, tp), ps)
        index = lax.dynamic_slice_in_dim(ctx_index, j * tp, tp)
        key_pos = (index[:, None] * ps + jnp.arange(ps, dtype=jnp.int32)).reshape(-1)
        visible = (key_row[None] == row_of[:, None]) & (key_pos[None] <= pos_of[:, None])  # [G·T, tile]
        if sliding_window is not None:
            visible &= key_pos[None] > pos_of[:, None] - sliding_window
        return _fold(carry, scores, visible[None], values.transpose(1, 0, 2), "kns,kse->kne")

    m, l, acc = lax.fori_loop(0, (pages_used + tp - 1) // tp, body, _empty((K, G * T), E))
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # padding tokens: zeros or garbage, never read
    return out.reshape(K, G, T, E).transpose(2, 0, 1, 3).reshape(T, H, E).astype(q.dtype)


def _ragged_pallas(q, kv, ctx_pages, ctx_row, token_row, positions, rows: int, sliding_window, interpret: bool):
    """The flattened call through the ragged prefill kernel, tokens left packed: each row's first
    token, its length and first position, and its pages as a page table of its own ([R, Q] ints)."""
    from meshserve.runtime.kernels.ragged_prefill import ragged_prefill

    Q = ctx_pages.shape[0]
    r = jnp.arange(rows, dtype=jnp.int32)
    in_row = token_row[None] == r[:, None]  # [R, T]
    row_len = in_row.sum(axis=1).astype(jnp.int32)
    row_first = jnp.argmax(in_row, axis=1).astype(jnp.int32)  # a row's tokens are contiguous
    page_in_row = ctx_row[None] == r[:, None]  # [R, Q]
    page_first = jnp.argmax(page_in_row, axis=1)
    j = jnp.arange(Q)
    tables = jnp.where(j[None] < page_in_row.sum(axis=1)[:, None],
                       ctx_pages[jnp.minimum(page_first[:, None] + j[None], Q - 1)], 0)
    return ragged_prefill(q, kv[0], kv[1], tables, row_first, positions[row_first], row_len, *kv[2:],
                          sliding_window=sliding_window, interpret=interpret)


ATTENTION = ("reference", "pallas")
_MASKED = -1e30  # finite, as in models.decoder.attention


def _attend_local(q, kv, tables, start, query_lens, *, attention: str, sliding_window: int | None,
                  shards: AttentionShards | None, interpret: bool):
    """Attention of one shard (or of everything, on one device); kv: a layer's arrays (KVPool.layer)."""
    tables, owned = _local_pages(tables, kv[0].shape[0], shards)
    kv_first = _shared_kv_head(q.shape[2], kv[0].shape[2], shards)
    if attention == "pallas":
        if kv_first is not None:
            raise ConfigError("attention: pallas needs kv heads split like q heads; use reference")
        out = _pallas_attention(q, kv, tables, start, query_lens, sliding_window, interpret)
    else:
        out = _decode_tiled(q, kv, tables, owned, start, sliding_window, kv_first)
    if owned is not None and shards.batch is None:
        # rows not split over data: every data shard computed them; keep the owner's result
        mine = owned[:, 0][:, None, None, None]
        out = lax.psum(jnp.where(mine, out, jnp.zeros_like(out)), shards.pages)
    return out


def _pallas_attention(q, kv, tables, start, query_lens, sliding_window, interpret: bool):
    from meshserve.runtime.kernels.paged_decode import paged_decode
    from meshserve.runtime.kernels.ragged_prefill import ragged_prefill

    B, T = q.shape[:2]
    if T == 1:  # decode: one token per row, at position start
        splits = max(1, tables.shape[1] // 32)  # split-K once contexts pass 32 pages
        return paged_decode(q[:, 0], kv[0], kv[1], tables, start + 1, *kv[2:], num_splits=splits,
                            sliding_window=sliding_window, interpret=interpret)[:, None]
    first = jnp.arange(B, dtype=jnp.int32) * T  # rows of T tokens, each its own chunk
    out = ragged_prefill(q.reshape(B * T, *q.shape[2:]), kv[0], kv[1], tables, first, start, query_lens, *kv[2:],
                         sliding_window=sliding_window, interpret=interpret)
    return out.reshape(q.shape)


def _replace(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1:]
