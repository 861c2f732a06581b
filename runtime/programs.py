"""The compiled programs, two families, each `jit(...).lower(...).compile()`d at start-up with the KV
pool donated, so serving never traces or compiles:

  prefill (tokens T): the prompt chunks of up to rows(T) requests flattened into one token axis of
          T (a bucket of the call's total), their contexts into one list of pages;
  decode (batch B): one token for each of B requests;
  verify (batch B, tokens T): speculative decoding — each of B requests feeds its last token and up
          to T - 1 drafted ones, and keeps the drafts the rejection sampler accepts (T is the
          engine's num_speculative_tokens + 1, fixed: fewer drafts pad, nothing recompiles).

    prefill_step(params, pool, last, PrefillBatch) -> (pool, last, Sampled, Scored, routing)
    decode_step(params, pool, last, DecodeBatch)   -> (pool, last, Sampled, Scored, routing)
    verify_step(params, pool, last, VerifyBatch)   -> (pool, last, Sampled [B, T], accepted [B], routing)

(routing: i32[MoE layers, experts], tokens each layer's router sent to each expert in this call.)

Sampled holds each row's next token (from its last position's logits); Scored the prompt scores of
every position, computed only when a row of the call asks for them (`targets`), else zeros.
Padding rows and tokens write to the null page and are never read back.

`last` (i32[slots], donated like the pool) is each running request's latest sampled token, kept on
the device at the request's slot: every call writes its rows' sampled tokens there, and a decode
row whose token is given as -1 reads its input from there. So the host can build and dispatch
step N+1 before it has read step N's tokens back (see the engine's async scheduling). The last
slot is padding's.

Buckets (see `Buckets.default`): tokens per prefill call ×2 apart, requests per decode call ×4 —
each bucket is a program to compile, and on a device whose matmuls are compute-bound (CPU) a padded
prompt token costs as much as a real one: with ×4 a prompt's last few-dozen-token chunk (the
uncached tail of a prompt whose prefix is cached, most often) paid for up to 4× its tokens. Not
context length: both attentions (the jnp one and the Pallas kernels) loop over the pages a call
really holds, so page tables are as wide as max_seq_len and one program serves every length.
`context_buckets` can still be set by hand.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
from typing import Iterable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from meshserve.models.config import ModelConfig
from meshserve.models.decoder import Params, forward_hidden, head, param_axes
from meshserve.models.moe import ExpertPlan
from meshserve.runtime import progress
from meshserve.runtime.block_manager import NULL_PAGE
from meshserve.runtime.kv_cache import AttentionShards, KVPool, PagedKVCache, RaggedKVCache, pool_shardings
from meshserve.runtime.sampling import Sampled, SamplingBatch, Scored, no_scores, sample, score, verify_drafts
from meshserve.runtime.target import CPU, Target
from meshserve.sharding.rules import Layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """A decode call: one token for each of B rows, packed into four arrays (each is a transfer).

    ints[:, :DECODE_INTS] = (token, position, write page, write slot, prompt length, slot), then the
    rows' sampling ints; a token of -1 is read from `last` at the row's slot (SamplingBatch.pack); floats: their sampling floats; page_tables: each row's
    pages; history: its tokens so far, -1 padded, for penalties (l = p * page_size); mask: the
    tokens each row may sample, as bits (structured outputs, runtime/grammar.py; w = ⌈vocab / 32⌉,
    all bits set for a row without a grammar)."""

    ints: Int[Array, "b i"]
    floats: Float[Array, "b f"]
    page_tables: Int[Array, "b p"]
    history: Int[Array, "b l"]
    mask: Int[Array, "b w"]


DECODE_INTS = 6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    """A ragged prefill call: T tokens of R rows (each row one request's prompt chunk, contiguous),
    their contexts as Q pages (see kv_cache.RaggedKVCache), packed into five arrays.

    tokens[PREFILL_TOKEN_FIELDS.index(name)]: per token — the token, its position, the page and
    slot its K/V is written to, its row (-1: padding) and its scoring target (-1: none);
    ctx: per page of the call's context — the page, its row (-1: padding), its index in the row;
    rows[:, :PREFILL_ROW_INTS] = (index in T of the row's last token, prompt length, slot), then
    the sampling ints; floats: the sampling floats; history as DecodeBatch (l = q * page_size);
    mask as DecodeBatch's, per row."""

    tokens: Int[Array, "6 t"]
    ctx: Int[Array, "3 q"]
    rows: Int[Array, "r i"]
    floats: Float[Array, "r f"]
    history: Int[Array, "r l"]
    mask: Int[Array, "r w"]


PREFILL_TOKEN_FIELDS = ("tokens", "positions", "write_pages", "write_slots", "token_row", "targets")
PREFILL_ROW_INTS = 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyBatch:
    """A verification call: per row, its last token then its drafts (T tokens, -1 past them).

    ints[:, :VERIFY_INTS] = (position of the last token, drafts, slot), then the
    sampling ints; floats: the sampling floats; page_tables: each row's pages (every position it
    writes included: the scheduler allocated them). Positions past a row's drafts, and padding
    rows (no pages), write to the null page."""

    ints: Int[Array, "b i"]
    floats: Float[Array, "b f"]
    tokens: Int[Array, "b t"]
    page_tables: Int[Array, "b p"]


VERIFY_INTS = 3


def _sample_and_score(params, x, last_x, sampling, history, prompt_len, targets, mask, config):
    logits = head(params, last_x[:, None], config=config)  # only the sampled ones'
    sampled = sample(logits[:, 0], sampling, history, prompt_len, mask)
    if targets is None:  # decode: never scores
        return sampled, no_scores(x.shape[0], 1)
    # every position's logits only when a row asked for prompt scores: the vocabulary head is costly
    scored = jax.lax.cond(jnp.any(targets >= 0), lambda h: score(head(params, h, config=config), targets),
                          lambda h: no_scores(*targets.shape), x)
    return sampled, scored


def decode_step(params: Params, pool: KVPool, last: Int[Array, "s"], batch: DecodeBatch, *, config: ModelConfig,
                attention: str = "reference", shards: AttentionShards | None = None, target: Target = CPU,
                experts: ExpertPlan = ExpertPlan()) -> tuple[KVPool, Int[Array, "s"], Sampled, Scored, Array]:
    tokens, positions, write_pages, write_slots, prompt_len, slots = (batch.ints[:, i] for i in range(DECODE_INTS))
    tokens = jnp.where(tokens < 0, last[slots], tokens)  # -1: the token the last call sampled for it
    cache = PagedKVCache(pool, batch.page_tables, write_pages[:, None], write_slots[:, None],
                         jnp.ones_like(tokens), attention, shards, target)
    x, cache, routing = forward_hidden(params, tokens[:, None], positions[:, None], cache, config=config,
                                       experts=experts, valid=(write_pages != NULL_PAGE)[:, None])
    sampling = SamplingBatch.unpack(batch.ints[:, DECODE_INTS:], batch.floats)
    sampled, scored = _sample_and_score(params, x, x[:, 0], sampling, batch.history, prompt_len, None, batch.mask,
                                        config)
    return cache.pool, last.at[slots].set(sampled.tokens), sampled, scored, routing


def prefill_step(params: Params, pool: KVPool, last: Int[Array, "s"], batch: PrefillBatch, *, config: ModelConfig,
                 attention: str = "reference", shards: AttentionShards | None = None, target: Target = CPU,
                 experts: ExpertPlan = ExpertPlan()) -> tuple[KVPool, Int[Array, "s"], Sampled, Scored, Array]:
    tokens, positions, write_pages, write_slots, token_row, targets = (batch.tokens[i] for i in range(6))
    ctx_pages, ctx_row, ctx_index = batch.ctx[0], batch.ctx[1], batch.ctx[2]
    final, prompt_len, slots = batch.rows[:, 0], batch.rows[:, 1], batch.rows[:, 2]
    cache = RaggedKVCache(pool, write_pages[None], write_slots[None], token_row, ctx_pages, ctx_row, ctx_index,
                          final.shape[0], attention, shards, target)
    x, cache, routing = forward_hidden(params, tokens[None], positions[None], cache, config=config,
                                       experts=experts, valid=(token_row >= 0)[None])
    sampling = SamplingBatch.unpack(batch.rows[:, PREFILL_ROW_INTS:], batch.floats)
    sampled, scored = _sample_and_score(params, x, x[0, final], sampling, batch.history, prompt_len,
                                        targets[None], batch.mask, config)
    return cache.pool, last.at[slots].set(sampled.tokens), sampled, scored, routing


def verify_step(params: Params, pool: KVPool, last: Int[Array, "s"], batch: VerifyBatch, *, config: ModelConfig,
                attention: str = "reference", shards: AttentionShards | None = None, target: Target = CPU,
                experts: ExpertPlan = ExpertPlan()) -> tuple[KVPool, Int[Array, "s"], Sampled, Array, Array]:
    start, counts, slots = (batch.ints[:, i] for i in range(VERIFY_INTS))
    B, T = batch.tokens.shape
    ps = pool.page_size
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)
    real = jnp.arange(T)[None] <= counts[:, None]
    index = jnp.minimum(positions // ps, batch.page_tables.shape[1] - 1)
    write_pages = jnp.where(real, jnp.take_along_axis(batch.page_tables, index, axis=1), NULL_PAGE)
    cache = PagedKVCache(pool, batch.page_tables, write_pages, positions % ps, counts + 1, attention, shards, target)
    tokens = jnp.maximum(batch.tokens, 0)
    x, cache, routing = forward_hidden(params, tokens, positions, cache, config=config, experts=experts,
                                       valid=real & (write_pages != NULL_PAGE))
    sampling = SamplingBatch.unpack(batch.ints[:, VERIFY_INTS:], batch.floats)
    sampled, accepted = verify_drafts(head(params, x, config=config), batch.tokens[:, 1:], counts, sampling)
    final = jnp.take_along_axis(sampled.tokens, accepted[:, None], axis=1)[:, 0]
    return cache.pool, last.at[slots].set(final), sampled, accepted, routing


# Logical axes of every batch field, for the sharding rules.
BATCH_AXES = DecodeBatch(("batch", "fields"), ("batch", "fields"), ("batch", "context"), ("batch", "context"),
                         ("batch", "fields"))
VERIFY_AXES = VerifyBatch(("batch", "fields"), ("batch", "fields"), ("batch", "fields"), ("batch", "context"))
PREFILL_AXES = PrefillBatch(("fields", "tokens"), ("fields", "context"), ("rows", "fields"), ("rows", "fields"),
                            ("rows", "context"), ("rows", "fields"))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shapes programs are compiled for. Prefill: a call's total tokens (`prefill_tokens`) and
    total context pages (`context_pages`: the width of its page list), with up to rows(T) requests;
    decode: requests per call (`decode_batch`) and pages per request (`context_pages`); verify
    (speculative decoding): requests per call (`verify_batch`, none: no speculation) of
    `verify_tokens` tokens each."""

    prefill_tokens: tuple[int, ...]
    decode_batch: tuple[int, ...]
    context_pages: tuple[int, ...]
    max_rows: int = 1  # requests one prefill call may take (max_num_seqs)
    verify_batch: tuple[int, ...] = ()
    verify_tokens: int = 0  # num_speculative_tokens + 1

    @staticmethod
    def pick(sizes: tuple[int, ...], n: int) -> int:
        for size in sizes:
            if size >= n:
                return size
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")

    @property
    def slots(self) -> int:
        """Length of the `last` token array: a slot per running request (at most max_rows), and
        padding's, the last."""
        return self.max_rows + 1

    def rows(self, tokens: int) -> int:
        """Rows of a prefill call of `tokens`: one per 8 tokens (a padding row costs its share of
        the vocabulary head), at most max_rows."""
        return max(1, min(self.max_rows, tokens // 8))

    def shapes(self, page_size: int) -> Iterable[tuple[str, int, int, int]]:
        """(family, rows or batch, tokens, pages) of every program to compile."""
        for p in self.context_pages:
            for t in self.prefill_tokens:
                # fewer pages than t tokens fill: the next pages bucket serves (the largest serves all)
                if t <= p * page_size or p == self.context_pages[-1]:
                    yield ("prefill", self.rows(t), t, p)
            for b in self.decode_batch:
                yield ("decode", b, 1, p)
            for b in self.verify_batch:
                yield ("verify", b, self.verify_tokens, p)

    @staticmethod
    def default(max_prefill_chunk: int, max_num_seqs: int, max_pages: int, replicas: int,
                prefill_while_decoding: int | None = None) -> "Buckets":
        """Few, coarse buckets (see the module's docstring): ×2 in tokens from 64, ×4 in batch, one
        context; and the prompt tokens a step takes while requests decode, when that is smaller."""
        tokens = geometric(min(64, max_prefill_chunk), max_prefill_chunk, 2)
        if prefill_while_decoding is not None and prefill_while_decoding < tokens[0]:
            tokens = (prefill_while_decoding, *tokens)
        return Buckets(prefill_tokens=tokens,
                       decode_batch=tuple(replicas * b for b in geometric(1, math.ceil(max_num_seqs / replicas), 4)),
                       context_pages=(max_pages,), max_rows=max_num_seqs)


def geometric(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    """lo, lo*factor, … up to and always including hi."""
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= factor
    return tuple(sizes + [hi])


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's token mask."""
    return (vocab_size + 31) // 32


def abstract_batch(family: str, rows: int, tokens: int, pages: int, page_size: int,
                   vocab_size: int) -> DecodeBatch | PrefillBatch:
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    if family == "verify":
        return VerifyBatch(i32(rows, VERIFY_INTS + SamplingBatch.INTS), f32(rows, SamplingBatch.FLOATS),
                           i32(rows, tokens), i32(rows, pages))
    if family == "prefill":
        return PrefillBatch(i32(len(PREFILL_TOKEN_FIELDS), tokens), i32(3, pages),
                            i32(rows, PREFILL_ROW_INTS + SamplingBatch.INTS), f32(rows, SamplingBatch.FLOATS),
                            i32(rows, pages * page_size), i32(rows, mask_words(vocab_size)))
    return DecodeBatch(i32(rows, DECODE_INTS + SamplingBatch.INTS), f32(rows, SamplingBatch.FLOATS),
                       i32(rows, pages), i32(rows, pages * page_size), i32(rows, mask_words(vocab_size)))


def lower_programs(config: ModelConfig, params, pool: KVPool, buckets: Buckets, attention: str,
                   layout: Layout) -> dict[tuple, jax.stages.Lowered]:
    """Every (family, batch, tokens, pages) program of `buckets`, lowered for the devices of the
    layout's mesh (real ones, or a topology's compile-only ones: the target is theirs, whatever
    backend this process runs). params and pool: arrays or ShapeDtypeStructs."""
    target = Target.of(layout.mesh.devices.flat[0])
    param_shardings = jax.tree.map(lambda names, a: layout.sharding(names, a.shape), param_axes(config),
                                   params, is_leaf=lambda x: isinstance(x, tuple))
    pool_sharding = pool_shardings(layout, pool)
    placed = lambda tree, shardings: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    params, pool = placed(params, param_shardings), placed(pool, pool_sharding)
    rep = layout.replicated()
    last = jax.ShapeDtypeStruct((buckets.slots,), jnp.int32, sharding=rep)
    lowered = {}
    for shape in buckets.shapes(pool.page_size):  # tracing is Python (serial); compiles can run on threads
        family = shape[0]
        batch = abstract_batch(*shape, pool.page_size, config.vocab_size)
        axes = {"prefill": PREFILL_AXES, "decode": BATCH_AXES, "verify": VERIFY_AXES}[family]
        batch_sharding = jax.tree.map(lambda names, a: layout.sharding(names, a.shape), axes, batch,
                                      is_leaf=lambda x: isinstance(x, tuple))
        batch = placed(batch, batch_sharding)
        step = {"prefill": prefill_step, "decode": decode_step, "verify": verify_step}[family]
        fn = functools.partial(step, config=config,
                               attention=attention, target=target, experts=layout.experts(config, target.platform),
                               shards=_shards(layout, 1 if family == "prefill" else shape[1], pool.num_pages))
        if layout.mesh.size == 1:  # one device: no partitioning pass (it only slows the compile)
            jitted = jax.jit(fn, donate_argnums=(1, 2))
        else:
            jitted = jax.jit(fn, donate_argnums=(1, 2),
                             in_shardings=(param_shardings, pool_sharding, rep, batch_sharding),
                             out_shardings=(pool_sharding, rep, rep, rep, rep))
        lowered[shape] = jitted.trace(params, pool, last, batch).lower()
    return lowered


def compiler_options(target: Target, config: ModelConfig) -> dict[str, bool]:
    """What XLA is told, beside the program, for a target. On GPUs a mixture of experts' grouped
    matmul (`ragged_dot`) goes to cuDNN's grouped GEMM: XLA's default lowering pads every group to all
    the rows, which for Qwen3-30B-A3B's 256-token prefill on an H100 wants 15.8 GiB of temporaries
    where 12.8 GiB are left (the deviceless GPU build's figures). Quantized weights add their own
    (models/quant.compiler_options)."""
    from meshserve.models.quant import compiler_options as quantized

    options = quantized(config.quantization, target.platform)
    if target.platform == "gpu" and config.num_experts:
        options["xla_gpu_experimental_use_ragged_dot_fusion"] = True
    return options


def _shards(layout: Layout, batch: int, num_pages: int) -> AttentionShards | None:
    if layout.mesh.size == 1:
        return None
    axis = lambda name, n: layout.spec((name,), (n,))[0]
    return AttentionShards(layout.mesh, axis("batch", batch), axis("pages", num_pages),
                           layout.axis("q_heads"), layout.axis("kv_heads"))


class Programs:
    """Every (family, batch, tokens, pages) program, compiled ahead of time, with in and out
    shardings from the layout's rules (one device: a 1×1 mesh)."""

    def __init__(self, config: ModelConfig, params: Params, pool: KVPool, buckets: Buckets,
                 threads: int | None = None, attention: str = "reference", layout: Layout | None = None,
                 cache_dir: str | None = None):
        self.config = config
        self.buckets = buckets
        self.page_size = pool.page_size
        self.layout = layout = layout or Layout.single()
        self.loaded = False  # read back whole from cache_dir: neither traced nor compiled
        saved = None
        if cache_dir is not None and layout.mesh.size == 1 and jax.process_count() == 1:
            saved = SavedPrograms(cache_dir, config, params, pool, buckets, attention)
            self.compiled = saved.load(list(layout.mesh.devices.flat))
            if self.compiled is not None:
                progress.stage(f"{len(self.compiled)} programs read from the compilation cache")
                self.loaded = True
                self.batch_shardings = {}
                return
        self.pool_sharding = pool_shardings(layout, pool)
        lowered = lower_programs(config, _abstract(params), _abstract(pool), buckets, attention, layout)
        workers = threads or max(1, os.cpu_count() or 1)
        counter = progress.Counter("compiling programs", len(lowered))
        options = compiler_options(Target.of(layout.mesh.devices.flat[0]), config)

        def compile_one(low):
            done = low.compile(options)
            counter.step()
            return done

        with concurrent.futures.ThreadPoolExecutor(workers) as pool_exec, \
                _without_jax_cache() if saved is not None else contextlib.nullcontext():
            compiled = dict(zip(lowered, pool_exec.map(compile_one, lowered.values())))
        self.compiled = compiled
        self.batch_shardings = {s: c.input_shardings[0][3] for s, c in compiled.items()}
        if saved is not None:
            saved.save(compiled)

    def __len__(self) -> int:
        return len(self.compiled)

    def prefill(self, tokens: int, pages: int):
        return self.compiled[("prefill", self.buckets.rows(tokens), tokens, pages)]

    def decode(self, batch: int, pages: int):
        return self.compiled[("decode", batch, 1, pages)]


class SavedPrograms:
    """A set of compiled programs kept whole in a file of the compilation cache folder, so a later
    start on the same model, config and code loads them without tracing anything (JAX's own cache
    still needs every program traced to find it: ~1.5 s each for a 30-layer model).

    The file is named by a hash of everything the programs depend on: jax, jaxlib, the device
    kind, the model config, the params' and pool's shapes and dtypes, the buckets, the attention
    and the source of meshserve's model and runtime code. Written whole or not at all (a temporary
    file, then a rename); one that cannot be read is ignored and the programs compiled again.
    One device in one process only. The folder must be as trusted as the code: loading a program
    runs it."""

    def __init__(self, folder: str, config: ModelConfig, params: Params, pool: KVPool, buckets: Buckets,
                 attention: str):
        import hashlib
        from pathlib import Path

        import jaxlib

        h = hashlib.sha256()
        device = jax.devices()[0]
        for part in (jax.__version__, jaxlib.__version__, device.platform, device.device_kind, repr(config),
                     str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), (params, pool))), repr(buckets), attention):
            h.update(str(part).encode() + b"\0")
        package = Path(__file__).resolve().parents[1]
        for folder_name in ("models", "runtime", "sharding"):
            for source in sorted((package / folder_name).rglob("*.py")):
                h.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
        self.path = Path(folder) / f"meshserve-programs-{h.hexdigest()[:32]}.pkl"

    def load(self, devices: list) -> dict | None:
        """The programs, on `devices`; None if none were saved or they cannot be read. (Loading
        runs what the file holds: the folder must be as trusted as the code.)"""
        import pickle

        from jax.experimental.serialize_executable import deserialize_and_load

        try:
            with open(self.path, "rb") as f:
                saved = pickle.load(f)
            return {shape: deserialize_and_load(*parts, backend=devices[0].client, execution_devices=devices)
                    for shape, parts in saved.items()}
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged or foreign file: compile instead
            import logging

            logging.getLogger("meshserve.programs").warning("saved programs %s unreadable (%s): compiling",
                                                            self.path, e)
            return None

    def save(self, compiled: dict) -> None:
        import pickle
        import tempfile

        from jax.experimental.serialize_executable import serialize

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = pickle.dumps({shape: serialize(c) for shape, c in compiled.items()})
            with tempfile.NamedTemporaryFile(dir=self.path.parent, delete=False) as f:
                f.write(data)
            os.replace(f.name, self.path)
        except Exception as e:  # a cache that cannot be written: only later starts are slower
            import logging

            logging.getLogger("meshserve.programs").warning("programs not saved to %s: %s", self.path, e)


@contextlib.contextmanager
def _without_jax_cache():
    """Compile afresh, past JAX's persistent cache, the programs of a set that will be saved whole:
    an executable XLA:CPU read back from that cache can be serialized again, and loaded, but then
    misses its functions when it runs ("Function … not found"). The cache's switch is read once per
    process, hence the resets."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def enable_compilation_cache(folder: str) -> None:
    """Persist compiled programs across runs (JAX's own cache; a process-wide setting)."""
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
