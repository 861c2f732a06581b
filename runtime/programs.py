"""The compiled programs, two families, each `jit(...).lower(...).compile()`d at start-up with the KV
pool donated, so serving never traces or compiles:

  prefill (tokens T): the prompt chunks of up to rows(T) requests flattened into one token axis of
          T (a bucket of the call's total), their contexts into one list of pages;
  decode (batch B): one token for each of B requests.

    prefill_step(params, pool, PrefillBatch) -> (pool, Sampled, Scored)
    decode_step(params, pool, StepBatch)     -> (pool, Sampled, Scored)

Sampled holds each row's next token (from its last position's logits); Scored the prompt scores of
every position, computed only when a row of the call asks for them (`targets`), else zeros.
Padding rows and tokens write to the null page and are never read back.

Buckets (see `Buckets.default`): tokens per prefill call and requests per decode call, ×4 apart —
on a device whose matmuls are compute-bound (CPU) a padded token costs as much as a real one, and
each bucket is a program to compile. Not context length: both attentions (the jnp one and the
Pallas kernels) loop over the pages a call really holds, so page tables are as wide as
max_seq_len and one program serves every length. `context_buckets` can still be set by hand.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Iterable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from meshserve.models.config import ModelConfig
from meshserve.models.llama import Params, forward_hidden, head, param_axes
from meshserve.runtime.kv_cache import POOL_AXES, AttentionShards, KVPool, PagedKVCache, RaggedKVCache
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    """A ragged prefill call: T tokens of R rows (each row one request's prompt chunk, contiguous),
    their contexts as Q pages (see kv_cache.RaggedKVCache)."""

    tokens: Int[Array, "t"]
    positions: Int[Array, "t"]
    write_pages: Int[Array, "t"]
    write_slots: Int[Array, "t"]
    token_row: Int[Array, "t"]  # -1: padding
    ctx_pages: Int[Array, "q"]
    ctx_row: Int[Array, "q"]
    ctx_index: Int[Array, "q"]
    last: Int[Array, "r"]  # index in t of each row's last token: its logits are sampled
    sampling: SamplingBatch
    history: Int[Array, "r l"]  # as StepBatch; l = q * page_size
    prompt_len: Int[Array, "r"]
    targets: Int[Array, "t"]  # prompt scoring: the token after each position, -1 where not asked


def _sample_and_score(params, x, last_x, batch, targets, config):
    logits = head(params, last_x[:, None], config=config)  # only the sampled ones'
    sampled = sample(logits[:, 0], batch.sampling, batch.history, batch.prompt_len)
    # every position's logits only when a row asked for prompt scores: the vocabulary head is costly
    scored = jax.lax.cond(jnp.any(targets >= 0), lambda h: score(head(params, h, config=config), targets),
                          lambda h: no_scores(*targets.shape), x)
    return sampled, scored


def decode_step(params: Params, pool: KVPool, batch: StepBatch, *, config: ModelConfig,
                attention: str = "reference", shards: AttentionShards | None = None) -> tuple[KVPool, Sampled, Scored]:
    cache = PagedKVCache(pool, batch.page_tables, batch.write_pages, batch.write_slots, batch.last + 1,
                         attention, shards)
    x, cache = forward_hidden(params, batch.tokens, batch.positions, cache, config=config)
    B = batch.tokens.shape[0]
    sampled, scored = _sample_and_score(params, x, x[jnp.arange(B), batch.last], batch, batch.targets, config)
    return cache.pool, sampled, scored


def prefill_step(params: Params, pool: KVPool, batch: PrefillBatch, *, config: ModelConfig,
                 attention: str = "reference", shards: AttentionShards | None = None
                 ) -> tuple[KVPool, Sampled, Scored]:
    cache = RaggedKVCache(pool, batch.write_pages[None], batch.write_slots[None], batch.token_row,
                          batch.ctx_pages, batch.ctx_row, batch.ctx_index, batch.last.shape[0], attention, shards)
    x, cache = forward_hidden(params, batch.tokens[None], batch.positions[None], cache, config=config)
    sampled, scored = _sample_and_score(params, x, x[0, batch.last], batch, batch.targets[None], config)
    return cache.pool, sampled, scored


# Logical axes of every batch field, for the sharding rules.
BATCH_AXES = StepBatch(("batch", "tokens"), ("batch", "tokens"), ("batch", "context"), ("batch", "tokens"),
                       ("batch", "tokens"), ("batch",),
                       SamplingBatch(*[("batch",)] * 10, ("batch", "top"), ("batch", "top")),
                       ("batch", "context"), ("batch",), ("batch", "tokens"))
PREFILL_AXES = PrefillBatch(*[("tokens",)] * 5, *[("context",)] * 3, ("rows",),
                            SamplingBatch(*[("rows",)] * 10, ("rows", "top"), ("rows", "top")),
                            ("rows", "context"), ("rows",), ("tokens",))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shapes programs are compiled for. Prefill: a call's total tokens (`prefill_tokens`) and
    total context pages (`context_pages`: the width of its page list), with up to rows(T) requests;
    decode: requests per call (`decode_batch`) and pages per request (`context_pages`)."""

    prefill_tokens: tuple[int, ...]
    decode_batch: tuple[int, ...]
    context_pages: tuple[int, ...]
    max_rows: int = 1  # requests one prefill call may take (max_num_seqs)

    @staticmethod
    def pick(sizes: tuple[int, ...], n: int) -> int:
        for size in sizes:
            if size >= n:
                return size
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")

    def rows(self, tokens: int) -> int:
        """Rows of a prefill call of `tokens`: one per 8 tokens (a padding row costs its share of
        the vocabulary head), at most max_rows."""
        return max(1, min(self.max_rows, tokens // 8))

    def shapes(self, page_size: int) -> Iterable[tuple[str, int, int, int]]:
        """(family, rows or batch, tokens, pages) of every program to compile."""
        for p in self.context_pages:
            for t in self.prefill_tokens:
                if t <= p * page_size:  # fewer pages could not hold t tokens: a smaller t bucket serves
                    yield ("prefill", self.rows(t), t, p)
            for b in self.decode_batch:
                yield ("decode", b, 1, p)

    @staticmethod
    def default(max_prefill_chunk: int, max_num_seqs: int, max_pages: int, replicas: int) -> "Buckets":
        """Few, coarse buckets (see the module's docstring): ×4 in tokens and in batch, one context."""
        return Buckets(prefill_tokens=geometric(min(64, max_prefill_chunk), max_prefill_chunk, 4),
                       decode_batch=tuple(replicas * b for b in geometric(1, math.ceil(max_num_seqs / replicas), 4)),
                       context_pages=(max_pages,), max_rows=max_num_seqs)


def geometric(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    """lo, lo*factor, … up to and always including hi."""
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= factor
    return tuple(sizes + [hi])


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _abstract_sampling(rows: int) -> SamplingBatch:
    f32 = jax.ShapeDtypeStruct((rows,), jnp.float32)
    return SamplingBatch(f32, _i32(rows), f32, f32, f32, f32, f32, _i32(rows), _i32(rows),
                         jax.ShapeDtypeStruct((rows,), jnp.bool_), _i32(rows, BIAS_SLOTS),
                         jax.ShapeDtypeStruct((rows, BIAS_SLOTS), jnp.float32))


def abstract_batch(family: str, rows: int, tokens: int, pages: int, page_size: int) -> StepBatch | PrefillBatch:
    if family == "prefill":
        return PrefillBatch(*[_i32(tokens)] * 5, *[_i32(pages)] * 3, _i32(rows), _abstract_sampling(rows),
                            _i32(rows, pages * page_size), _i32(rows), _i32(tokens))
    b = rows
    return StepBatch(_i32(b, tokens), _i32(b, tokens), _i32(b, pages), _i32(b, tokens), _i32(b, tokens), _i32(b),
                     _abstract_sampling(b), _i32(b, pages * page_size), _i32(b), _i32(b, tokens))


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
            family = shape[0]
            batch = abstract_batch(*shape, self.page_size)
            axes = PREFILL_AXES if family == "prefill" else BATCH_AXES
            batch_sharding = jax.tree.map(lambda names, a: layout.sharding(names, a.shape), axes, batch,
                                          is_leaf=lambda x: isinstance(x, tuple))
            fn = functools.partial(prefill_step if family == "prefill" else decode_step, config=config,
                                   attention=attention,
                                   shards=self._shards(layout, 1 if family == "prefill" else shape[1], pool.num_pages))
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
        return self.compiled[("prefill", self.buckets.rows(tokens), tokens, pages)]

    def decode(self, batch: int, pages: int):
        return self.compiled[("decode", batch, 1, pages)]


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def enable_compilation_cache(folder: str) -> None:
    """Persist compiled programs across runs (JAX's own cache; a process-wide setting)."""
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
