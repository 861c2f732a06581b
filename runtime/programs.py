"""The compiled programs: prefill (one request's prompt chunk, by token-count bucket) and decode (one
token for each of a batch of requests, by batch bucket), each also by context bucket (how many pages
of keys attention reads). All are `jit(...).lower(...).compile()`d at start-up, with the KV pool
donated, so serving never traces or compiles.

Both families run one pure step function:

    step(params, pool, batch) -> (pool, Sampled)

`StepBatch` carries everything per call as arrays; padding rows and tokens write to the null page and
are never read back.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from models.config import ModelConfig
from models.llama import Params, forward
from runtime.kv_cache import KVPool, PagedKVCache
from runtime.sampling import Sampled, SamplingBatch, sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    tokens: Int[Array, "b t"]
    positions: Int[Array, "b t"]
    page_tables: Int[Array, "b p"]
    write_pages: Int[Array, "b t"]
    write_slots: Int[Array, "b t"]
    last: Int[Array, "b"]  # index in t of each row's last real token: its logits are sampled
    sampling: SamplingBatch
    history: Int[Array, "b l"]  # tokens so far, -1 padded (for penalties); l = p * page_size
    prompt_len: Int[Array, "b"]


def step(params: Params, pool: KVPool, batch: StepBatch, *, config: ModelConfig,
         attention: str = "reference") -> tuple[KVPool, Sampled]:
    cache = PagedKVCache(pool, batch.page_tables, batch.write_pages, batch.write_slots, batch.last + 1,
                         attention)
    logits, cache = forward(params, batch.tokens, batch.positions, cache, config=config,
                            logits_at=batch.last)
    return cache.pool, sample(logits[:, 0], batch.sampling, batch.history, batch.prompt_len)


@dataclasses.dataclass(frozen=True)
class Buckets:
    prefill_tokens: tuple[int, ...]  # prompt-chunk lengths (batch of one)
    decode_batch: tuple[int, ...]  # requests per decode call
    context_pages: tuple[int, ...]  # pages of keys per request

    @staticmethod
    def pick(sizes: tuple[int, ...], n: int) -> int:
        for size in sizes:
            if size >= n:
                return size
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")

    def shapes(self, page_size: int) -> Iterable[tuple[str, int, int, int]]:
        """(family, batch, tokens, pages) of every program to compile."""
        for p in self.context_pages:
            for t in self.prefill_tokens:
                if t <= p * page_size:  # a chunk of t tokens needs at least t slots
                    yield ("prefill", 1, t, p)
            for b in self.decode_batch:
                yield ("decode", b, 1, p)


def geometric(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    """lo, lo*factor, … up to and always including hi."""
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= factor
    return tuple(sizes + [hi])


def abstract_batch(batch: int, tokens: int, pages: int, page_size: int) -> StepBatch:
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    sampling = SamplingBatch(f32(batch), i32(batch), f32(batch), f32(batch), f32(batch), f32(batch),
                             f32(batch), i32(batch), i32(batch), jax.ShapeDtypeStruct((batch,), jnp.bool_))
    return StepBatch(i32(batch, tokens), i32(batch, tokens), i32(batch, pages), i32(batch, tokens),
                     i32(batch, tokens), i32(batch), sampling, i32(batch, pages * page_size), i32(batch))


class Programs:
    """Every (family, batch, tokens, pages) program, compiled ahead of time."""

    def __init__(self, config: ModelConfig, params: Params, pool: KVPool, buckets: Buckets,
                 threads: int | None = None, attention: str = "reference"):
        self.config = config
        self.buckets = buckets
        self.page_size = pool.page_size
        jitted = jax.jit(functools.partial(step, config=config, attention=attention), donate_argnums=(1,))
        abstract = lambda tree: jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)
        params_spec, pool_spec = abstract(params), abstract(pool)
        shapes = list(buckets.shapes(self.page_size))
        # Tracing is Python (serial); XLA compiles release the GIL, so they overlap on threads.
        lowered = {s: jitted.lower(params_spec, pool_spec, abstract_batch(*s[1:], self.page_size))
                   for s in shapes}
        workers = threads or max(1, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool_exec:
            compiled = dict(zip(lowered, pool_exec.map(lambda low: low.compile(), lowered.values())))
        self.compiled = compiled

    def __len__(self) -> int:
        return len(self.compiled)

    def prefill(self, tokens: int, pages: int):
        return self.compiled[("prefill", 1, tokens, pages)]

    def decode(self, batch: int, pages: int):
        return self.compiled[("decode", batch, 1, pages)]


def enable_compilation_cache(folder: str) -> None:
    """Persist compiled programs across runs (JAX's own cache; a process-wide setting)."""
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
