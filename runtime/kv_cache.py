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

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from models.config import ModelConfig
from models.errors import ConfigError
from models.llama import attention
from runtime.block_manager import NULL_PAGE  # noqa: F401  (the page padding writes go to)


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


def abstract_pool(config: ModelConfig, num_pages: int, page_size: int, dtype) -> KVPool:
    spec = jax.ShapeDtypeStruct(pool_shape(config, num_pages, page_size), jnp.dtype(dtype))
    return KVPool((spec,) * config.num_layers, (spec,) * config.num_layers)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """The pool plus this call's metadata; implements models.llama.KVCache.

    page_tables:  i32[B, P]  the pages of each row's sequence, in order
    write_pages:  i32[B, T]  where each new token's K/V goes (NULL_PAGE for padding)
    write_slots:  i32[B, T]  the offset inside that page
    query_lens:   i32[B]     real (non-padding) tokens of each row; they sit at positions[b, 0] + t
    attention:    "reference" (gather the pages, dense jnp attention) or "pallas" (runtime/kernels)
    """

    pool: KVPool
    page_tables: Int[Array, "b p"]
    write_pages: Int[Array, "b t"]
    write_slots: Int[Array, "b t"]
    query_lens: Int[Array, "b"]
    attention: str = dataclasses.field(default="reference", metadata=dict(static=True))

    def attend(self, layer, q, k, v, positions, sliding_window):
        kp = self.pool.k[layer].at[self.write_pages, self.write_slots].set(k.astype(self.pool.k[layer].dtype))
        vp = self.pool.v[layer].at[self.write_pages, self.write_slots].set(v.astype(self.pool.v[layer].dtype))
        if self.attention == "pallas":
            out = _pallas_attention(q, kp, vp, self.page_tables, positions[:, 0], self.query_lens,
                                    sliding_window)
        else:
            keys, values = _gather(kp, self.page_tables), _gather(vp, self.page_tables)
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1], dtype=jnp.int32), keys.shape[:2])
            out = attention(q, keys, values, positions, key_pos, sliding_window)
        pool = KVPool(_replace(self.pool.k, layer, kp), _replace(self.pool.v, layer, vp))
        return out, dataclasses.replace(self, pool=pool)


ATTENTION = ("reference", "pallas")


def _pallas_attention(q, k_pages, v_pages, tables, start, query_lens, sliding_window):
    from runtime.kernels.paged_decode import paged_decode
    from runtime.kernels.ragged_prefill import ragged_prefill

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
