"""The paged KV cache: one pool of fixed-size pages per layer, shared by every running request.

    pool.k[layer], pool.v[layer]: [num_pages, page_size, kv_heads, head_dim]

    page table of a request (i32[P]):  [ 7, 2, 9, 0, 0 ]   → positions 0..15 in page 7, 16..31 in
                                                             page 2, 32..47 in page 9; 0 = unused
Page-major with tokens inside a page contiguous: a page is one contiguous block per layer, so
moving a page (offload, prefix sharing) is one slice, and gathering a request's pages is one take.
Page 0 is the null page: never allocated, it absorbs the writes of padding tokens, and page-table
slots past a request's length point at it (they are masked by position, never read as data).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float, Int

from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConfigError
from meshserve.models.llama import attention as attention_ref
from meshserve.runtime.block_manager import NULL_PAGE  # noqa: F401  (the page padding writes go to)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPool:
    k: tuple[Array, ...]  # per layer [N, page_size, K, E]
    v: tuple[Array, ...]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


def page_bytes(config: ModelConfig, page_size: int, dtype) -> int:
    """Bytes one page takes across all layers, keys and values."""
    return 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * np.dtype(dtype).itemsize


def pages_for_budget(config: ModelConfig, page_size: int, dtype, kv_cache_bytes: int) -> int:
    n = kv_cache_bytes // page_bytes(config, page_size, dtype)
    if n < 2:
        raise ConfigError(f"kv_cache_bytes={kv_cache_bytes} holds fewer than 2 pages of "
                          f"{page_bytes(config, page_size, dtype)} bytes")
    return int(n)


def pool_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (num_pages, page_size, config.num_kv_heads, config.head_dim)


def zeros_pool(config: ModelConfig, num_pages: int, page_size: int, dtype) -> KVPool:
    shape = pool_shape(config, num_pages, page_size)
    return KVPool(tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                  tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))


def sharded_zeros_pool(config: ModelConfig, num_pages: int, page_size: int, dtype, sharding) -> KVPool:
    """A zero pool created in place on its devices (never whole on one device first)."""
    shape = pool_shape(config, num_pages, page_size)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KVPool(tuple(make() for _ in range(config.num_layers)), tuple(make() for _ in range(config.num_layers)))


def abstract_pool(config: ModelConfig, num_pages: int, page_size: int, dtype) -> KVPool:
    spec = jax.ShapeDtypeStruct(pool_shape(config, num_pages, page_size), jnp.dtype(dtype))
    return KVPool((spec,) * config.num_layers, (spec,) * config.num_layers)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """The pool plus this call's metadata; implements models.llama.KVCache.

    page_tables:  i32[B, P]  the pages of each row's sequence, in order
    write_pages:  i32[B, T]  where each new token's K/V goes (NULL_PAGE for padding)
    write_slots:  i32[B, T]  the offset inside that page
    query_lens:   i32[B]     real (non-padding) tokens of each row; they sit at positions[b, 0] + t
    attention:    "reference" (gather the pages, dense jnp attention) or "pallas" (runtime/kernels)
    shards:       how attention splits over the mesh; None on one device
    """

    pool: KVPool
    page_tables: Int[Array, "b p"]
    write_pages: Int[Array, "b t"]
    write_slots: Int[Array, "b t"]
    query_lens: Int[Array, "b"]
    attention: str = dataclasses.field(default="reference", metadata=dict(static=True))
    shards: AttentionShards | None = dataclasses.field(default=None, metadata=dict(static=True))

    def attend(self, layer, q, k, v, positions, sliding_window):
        kp = self.pool.k[layer].at[self.write_pages, self.write_slots].set(k.astype(self.pool.k[layer].dtype))
        vp = self.pool.v[layer].at[self.write_pages, self.write_slots].set(v.astype(self.pool.v[layer].dtype))
        fn = functools.partial(_attend_local, attention=self.attention, sliding_window=sliding_window,
                               shards=self.shards)
        if self.shards is None:
            out = fn(q, kp, vp, self.page_tables, positions[:, 0], self.query_lens)
        else:
            q_spec, pool_spec, table_spec, row_spec = self.shards.specs()
            out = jax.shard_map(fn, mesh=self.shards.mesh, check_vma=False,
                                in_specs=(q_spec, pool_spec, pool_spec, table_spec, row_spec, row_spec),
                                out_specs=q_spec)(q, kp, vp, self.page_tables, positions[:, 0], self.query_lens)
        pool = KVPool(_replace(self.pool.k, layer, kp), _replace(self.pool.v, layer, vp))
        return out, dataclasses.replace(self, pool=pool)


ATTENTION = ("reference", "pallas")


def _attend_local(q, k_pages, v_pages, tables, start, query_lens, *, attention: str,
                  sliding_window: int | None, shards: AttentionShards | None):
    """Attention of one shard (or of everything, on one device)."""
    owned = None
    if shards is not None and shards.pages is not None:  # this data shard's pages, ids made local
        n_local = k_pages.shape[0]
        local = tables - lax.axis_index(shards.pages) * n_local
        owned = (local >= 0) & (local < n_local)
        tables = jnp.where(owned, local, 0)
    kv_first = None
    if shards is not None and shards.q_heads is not None and shards.kv_heads is None:
        # kv heads replicated, q heads split: this shard's q heads share one kv head
        group = q.shape[2] * shards.mesh.shape[shards.q_heads] // k_pages.shape[2]
        kv_first = lax.axis_index(shards.q_heads) * q.shape[2] // group
    if attention == "pallas":
        if kv_first is not None:
            raise ConfigError("attention: pallas needs kv heads split like q heads; use reference")
        out = _pallas_attention(q, k_pages, v_pages, tables, start, query_lens, sliding_window)
    else:
        keys, values = _gather(k_pages, tables), _gather(v_pages, tables)
        if kv_first is not None:
            keys = lax.dynamic_slice_in_dim(keys, kv_first, 1, axis=2)
            values = lax.dynamic_slice_in_dim(values, kv_first, 1, axis=2)
        key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1], dtype=jnp.int32), keys.shape[:2])
        positions = start[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)
        out = attention_ref(q, keys, values, positions, key_pos, sliding_window)
    if owned is not None and shards.batch is None:
        # rows not split over data: every data shard computed them; keep the owner's result
        mine = owned[:, 0][:, None, None, None]
        out = lax.psum(jnp.where(mine, out, jnp.zeros_like(out)), shards.pages)
    return out


def _pallas_attention(q, k_pages, v_pages, tables, start, query_lens, sliding_window):
    from meshserve.runtime.kernels.paged_decode import paged_decode
    from meshserve.runtime.kernels.ragged_prefill import ragged_prefill

    interpret = jax.default_backend() == "cpu"  # CPU runs the kernels in the Pallas interpreter
    if q.shape[1] == 1:  # decode: one token per row, at position start
        splits = max(1, tables.shape[1] // 32)  # split-K once contexts pass 32 pages
        return paged_decode(q[:, 0], k_pages, v_pages, tables, start + 1, num_splits=splits,
                            sliding_window=sliding_window, interpret=interpret)[:, None]
    return ragged_prefill(q, k_pages, v_pages, tables, start, query_lens, sliding_window=sliding_window,
                          interpret=interpret)


def _gather(pages: Float[Array, "n s k e"], tables: Int[Array, "b p"]) -> Float[Array, "b ps k e"]:
    g = pages[tables]  # [B, P, page_size, K, E]
    return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


def _replace(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1:]
