"""The compiled programs: prefill (one request's prompt chunk, by token-count bucket) and decode (one
token for each of a batch of requests, by batch bucket), each also by context bucket (how many pages
of keys attention reads). All are `jit(...).lower(...).compile()`d at start-up, with the KV pool
donated, so serving never traces or compiles.

Both families run one pure step function:

    step(params, pool, batch) -> (pool, Sampled, Scored)

Sampled holds each row's next token (from its last position's logits); Scored the prompt scores of
every position, computed only when a row of the call asks for them (`targets`), else zeros.

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

from meshserve.models.config import ModelConfig
from meshserve.models.llama import Params, forward_hidden, head, param_axes
from meshserve.runtime.kv_cache import POOL_AXES, AttentionShards, KVPool, PagedKVCache
from meshserve.runtime.sampling import BIAS_SLOTS, Sampled, SamplingBatch, Scored, no_scores, sample, score
from meshserve.sharding.rules import Layout


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
    targets: Int[Array, "b t"]  # prompt scoring: the token after each position, -1 where not asked


def step(params: Params, pool: KVPool, batch: StepBatch, *, config: ModelConfig,
         attention: str = "reference", shards: AttentionShards | None = None) -> tuple[KVPool, Sampled, Scored]:
    cache = PagedKVCache(pool, batch.page_tables, batch.write_pages, batch.write_slots, batch.last + 1,
                         attention, shards)
    x, cache = forward_hidden(params, batch.tokens, batch.positions, cache, config=config)
    B, T = batch.tokens.shape
    logits = head(params, x[jnp.arange(B), batch.last][:, None], config=config)  # only the sampled ones'
    sampled = sample(logits[:, 0], batch.sampling, batch.history, batch.prompt_len)
    # every position's logits only when a row asked for prompt scores: the vocabulary head is costly
    scored = jax.lax.cond(jnp.any(batch.targets >= 0),
                          lambda h: score(head(params, h, config=config), batch.targets),
                          lambda h: no_scores(B, T), x)
    return cache.pool, sampled, scored


# Logical axes of every StepBatch field, for the sharding rules.
BATCH_AXES = StepBatch(("batch", "tokens"), ("batch", "tokens"), ("batch", "context"), ("batch", "tokens"),
                       ("batch", "tokens"), ("batch",),
                       SamplingBatch(*[("batch",)] * 10, ("batch", "top"), ("batch", "top")),
                       ("batch", "context"), ("batch",), ("batch", "tokens"))


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
                             f32(batch), i32(batch), i32(batch), jax.ShapeDtypeStruct((batch,), jnp.bool_),
                             i32(batch, BIAS_SLOTS), f32(batch, BIAS_SLOTS))
    return StepBatch(i32(batch, tokens), i32(batch, tokens), i32(batch, pages), i32(batch, tokens),
                     i32(batch, tokens), i32(batch), sampling, i32(batch, pages * page_size), i32(batch),
                     i32(batch, tokens))


class Programs:
    """Every (family, batch, tokens, pages) program, compiled ahead of time, with in and out
    shardings from the layout's rules (one device: a 1×1 mesh)."""

    def __init__(self, config: ModelConfig, params: Params, pool: KVPool, buckets: Buckets,
                 threads: int | None = None, attention: str = "reference", layout: Layout | None = None):
        self.config = config
        self.buckets = buckets
        self.page_size = pool.page_size
        self.layout = layout = layout or Layout.single()
        param_shardings = jax.tree.map(lambda names, a: layout.sharding(names, a.shape), param_axes(config),
                                       params, is_leaf=lambda x: isinstance(x, tuple))
        self.pool_sharding = jax.tree.map(lambda a: layout.sharding(POOL_AXES, a.shape), pool)
        shapes = list(buckets.shapes(self.page_size))
        lowered = {}
        for shape in shapes:  # tracing is Python (serial); XLA compiles release the GIL: threads below
            batch = abstract_batch(*shape[1:], self.page_size)
            batch_sharding = jax.tree.map(lambda names, a: layout.sharding(names, a.shape), BATCH_AXES, batch,
                                          is_leaf=lambda x: isinstance(x, tuple))
            fn = functools.partial(step, config=config, attention=attention,
                                   shards=self._shards(layout, shape[1], pool.num_pages))
            if layout.mesh.size == 1:  # one device: no partitioning pass (it only slows the compile)
                jitted = jax.jit(fn, donate_argnums=(1,))
            else:
                jitted = jax.jit(fn, donate_argnums=(1,),
                                 in_shardings=(param_shardings, self.pool_sharding, batch_sharding),
                                 out_shardings=(self.pool_sharding, layout.replicated(), layout.replicated()))
            lowered[shape] = jitted.lower(_abstract(params), _abstract(pool), batch)
        workers = threads or max(1, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool_exec:
            compiled = dict(zip(lowered, pool_exec.map(lambda low: low.compile(), lowered.values())))
        self.compiled = compiled
        self.batch_shardings = {s: c.input_shardings[0][2] for s, c in compiled.items()}

    @staticmethod
    def _shards(layout: Layout, batch: int, num_pages: int) -> AttentionShards | None:
        if layout.mesh.size == 1:
            return None
        axis = lambda name, n: layout.spec((name,), (n,))[0]
        return AttentionShards(layout.mesh, axis("batch", batch), axis("pages", num_pages),
                               layout.axis("q_heads"), layout.axis("kv_heads"))

    def __len__(self) -> int:
        return len(self.compiled)

    def prefill(self, tokens: int, pages: int):
        return self.compiled[("prefill", 1, tokens, pages)]

    def decode(self, batch: int, pages: int):
        return self.compiled[("decode", batch, 1, pages)]


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def enable_compilation_cache(folder: str) -> None:
    """Persist compiled programs across runs (JAX's own cache; a process-wide setting)."""
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
