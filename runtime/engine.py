"""The engine: many requests share one device through the paged KV cache and the compiled programs.

    engine = Engine(checkpoint, EngineConfig(...))     # compiles every program, then is ready
    rid = engine.add_request("Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished:
        for out in engine.step(): ...                  # RequestOutput: new tokens and text
    engine.generate(prompts, params)                   # the same, blocking, for offline use

One `step` = one scheduler plan, run by the model runner: the step's prompt chunks in ragged
prefill calls, then the decode calls for every request that is generating. The engine is
single-threaded; a server drives it from its own thread (serving/engine_loop.py).

Async scheduling (`EngineConfig.async_scheduling`, on by default): a step is planned, built and
dispatched while the device still runs the one before; only then does the host read that one's
tokens back and act on them (stop conditions, text), so the device does not wait for the host
between steps. A request's token from step N is PENDING on the host when step N+1 is built: the
decode reads it on the device (runner.py's slots). `step` returns step N's outputs from the call
that dispatched step N+1. A request that ends at step N has had a row in step N+1 computed for
nothing, whose result is dropped; an abort between two calls still frees its pages at once (later
steps are ordered after the ones in flight on the device). A step that would need a PENDING token
on the host (a prompt chunk over it after a preemption, a penalized row's history) reads the last
step back first.

Failure contract:
  - a request that passes `validate_request` never waits for pages that cannot exist, nor for a
    program that was not compiled: the KV cache is checked at start-up to hold one `max_seq_len`
    request on every data replica, and every bucket covers the config's limits;
  - a fault in one request's host work (building its rows, reading its results) ends that request
    with finish reason "error"; the others in the step go on;
  - any other fault in a step — above all once a program was dispatched (the KV pool is donated, so
    its contents are unknown) — is fatal: `step` raises EngineFault, and every later call raises it
    again. A step whose dispatch fails never commits, so no page it was to fill is ever found
    in the prefix cache; a fault the device reports only when a step is read back (async
    scheduling: after that step committed) fails the engine before any later step runs or anything
    is persisted to the store. Whoever drives the engine reports it and exits.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
import os
import time
from typing import Any, Mapping, Sequence as Seq

import jax
import numpy as np

from meshserve.models.checkpoint import Checkpoint
from meshserve.models.config import ModelConfig, config_from_dict, read_yaml_section
from meshserve.models.errors import ConfigError, MeshserveError, RequestError
from meshserve.runtime.block_manager import BlockManager
from meshserve.runtime.clock import Seeds, clock_for
from meshserve.runtime.identity import model_fingerprint
from meshserve.runtime.kv_cache import ATTENTION, POOL_AXES, page_bytes, pages_for_budget, pool_shape, sharded_zeros_pool
from meshserve.runtime.kv_tiers import TRANSFER_PAGES, HostTier, KVEvent, KVEvents, LowerTiers, PageMover, StoreTier
from meshserve.runtime.kv_transfer import KVPages, TransferError
from meshserve.runtime.programs import Buckets, Programs, enable_compilation_cache
from meshserve.runtime.request import RequestLimits, check_request
from meshserve.runtime.runner import PENDING, ModelRunner
from meshserve.runtime.sampling import SamplingParams
from meshserve.runtime.scheduler import QueueFull, Scheduler, SchedulerConfig, Sequence, Status
from meshserve.runtime.target import Target
from meshserve.runtime.text import NoText, TextStream
from meshserve.sharding.rules import Layout

log = logging.getLogger("meshserve.engine")


class QueueFullError(MeshserveError):
    """The waiting queue is full (gRPC: RESOURCE_EXHAUSTED)."""


class EngineFault(MeshserveError):
    """The engine cannot go on (a fault after a program was dispatched); every call raises it."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    kv_cache_bytes: int | None = 256 * 2**20  # None: kv_cache_memory_fraction of free device memory
    kv_cache_memory_fraction: float = 0.5
    max_seq_len: int = 2048  # capped at the model's context
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 256
    max_queue_size: int = 256
    queue_timeout_s: float | None = None
    priority_levels: int = 3
    prefill_tokens_while_decoding: int | None = None  # see SchedulerConfig; None: no limit
    prefill_buckets: tuple[int, ...] | None = None  # tokens per prefill call; None: 64, 128, … ×2 up to max_prefill_chunk
    decode_buckets: tuple[int, ...] | None = None  # None: 1, 4, 16, … up to max_num_seqs
    context_buckets: tuple[int, ...] | None = None  # in pages; None: one, of max_seq_len (attention reads real pages only)
    compilation_cache_dir: str | None = None
    compile_threads: int | None = None
    attention: str | None = None  # reference | pallas; None: pallas on GPU, reference elsewhere
    enable_prefix_caching: bool = True  # reuse the KV pages of prompt prefixes seen before
    host_kv_bytes: int = 0  # host memory for prefix pages evicted from the device (0: none)
    kv_store: str | None = None  # tensorstore tier for pages leaving host memory: a folder or kvstore URL
    kv_store_write_through: bool = False  # also write every offloaded page to the store at once
    limits: RequestLimits = RequestLimits()  # what one request may carry (stop strings, stop ids)
    # build and dispatch step N+1 before reading step N back (its tokens feed N+1 on the device);
    # `step` then returns step N's outputs. False: each step is read back before the next is built.
    async_scheduling: bool = True
    # compile the programs that export and import a prompt's KV pages (disaggregated prefill and
    # decode: runtime/kv_transfer.py)
    kv_transfer: bool = False

    def __post_init__(self):
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a power of two, got {self.page_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes must be positive or null, got {self.kv_cache_bytes}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError("kv_cache_memory_fraction must be in (0, 1]")
        if self.max_seq_len < self.page_size:
            raise ConfigError(f"max_seq_len must be >= page_size, got {self.max_seq_len}")
        if self.attention not in (None, *ATTENTION):
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.host_kv_bytes < 0:
            raise ConfigError(f"host_kv_bytes must be >= 0, got {self.host_kv_bytes}")
        if (self.host_kv_bytes or self.kv_store) and not self.enable_prefix_caching:
            raise ConfigError("host_kv_bytes and kv_store need enable_prefix_caching")
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ConfigError("max_prefill_chunk must be <= max_num_batched_tokens")
        self._check_buckets()
        try:
            self.scheduler_config()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check_buckets(self) -> None:
        """Buckets given by hand must cover the limits: a chunk or a context with no program to run
        it would fail at step time, for every request in the step."""
        for name in ("prefill_buckets", "decode_buckets", "context_buckets"):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
                raise ConfigError(f"{name} must be positive integers, got {list(sizes)}")
            if list(sizes) != sorted(set(sizes)):
                raise ConfigError(f"{name} must be in increasing order, got {list(sizes)}")
        if self.prefill_buckets and self.prefill_buckets[-1] < self.max_prefill_chunk:
            raise ConfigError(f"prefill_buckets: the largest ({self.prefill_buckets[-1]}) must be >= "
                              f"max_prefill_chunk ({self.max_prefill_chunk})")
        if self.context_buckets and self.context_buckets[-1] * self.page_size < self.max_seq_len:
            raise ConfigError(f"context_buckets: the largest ({self.context_buckets[-1]} pages of "
                              f"{self.page_size}) must hold max_seq_len ({self.max_seq_len} tokens)")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "EngineConfig":
        """The `engine:` section of a serving config file."""
        return cls.from_dict(read_yaml_section(path, "engine"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EngineConfig":
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "limits" in values:
            values["limits"] = config_from_dict(RequestLimits, values["limits"], "engine config limits")
        return config_from_dict(cls, values, "engine config")

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_prefill_chunk,
                               self.max_queue_size, self.queue_timeout_s, self.priority_levels,
                               prefill_tokens_while_decoding=self.prefill_tokens_while_decoding)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: tuple[int, ...]  # new this step
    text: str  # new this step
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | rejected | error
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token; a stop token that ended it adds its own
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_time_s: float | None = None  # arrival → first scheduled (None: never scheduled)
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # with the first token, when asked: one per prompt token, the first None (nothing precedes it)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(eq=False)
class _Request:
    seq: Sequence
    params: SamplingParams
    seed: int
    text: TextStream | NoText  # NoText: the request asked for token ids only
    stop_ids: frozenset[int]
    prompt_scores: list[TokenLogprob] | None = None  # scores of prompt tokens 1…, while being computed
    fork_of: str | None = None  # waits for this request's prompt to be computed (see add_request)

    @property
    def scoring(self) -> bool:
        return self.prompt_scores is not None and len(self.prompt_scores) < self.seq.prompt_len - 1


def kv_pages(model: ModelConfig, dtype, config: EngineConfig, replicas: int, budget: int) -> int:
    """Pages of a KV pool of `budget` bytes, split evenly over the data replicas; ConfigError when
    one replica could not hold a single max_seq_len request (it would wait for pages forever)."""
    ps = config.page_size
    num_pages = pages_for_budget(model, ps, dtype, budget)
    num_pages -= num_pages % replicas  # each data replica owns an equal range of pages
    per_replica = num_pages // replicas - 1  # usable: the first page of each range is its null page
    max_seq_len = min(config.max_seq_len, model.max_position_embeddings)
    if per_replica * ps < max_seq_len:
        need = (math.ceil(max_seq_len / ps) + 1) * replicas * page_bytes(model, ps, dtype)
        raise ConfigError(
            f"the KV cache holds {max(per_replica, 0) * ps} tokens per data replica ({num_pages} pages of "
            f"{ps} tokens{f' over {replicas} replicas' if replicas > 1 else ''}), fewer than max_seq_len "
            f"({max_seq_len}): one request could never fit; set kv_cache_bytes to at least {need} "
            f"or lower max_seq_len")
    return num_pages


def engine_buckets(config: EngineConfig, max_pages: int, replicas: int) -> Buckets:
    """The shapes an engine compiles programs for: the config's buckets, else Buckets.default."""
    default = Buckets.default(config.max_prefill_chunk, config.max_num_seqs, max_pages, replicas,
                              config.prefill_tokens_while_decoding)
    return Buckets(prefill_tokens=config.prefill_buckets or default.prefill_tokens,
                   decode_batch=config.decode_buckets or default.decode_batch,
                   context_pages=config.context_buckets or default.context_pages,
                   max_rows=config.max_num_seqs)


class Engine:
    """`layout` (sharding.rules.Layout, from a mesh file) says which devices and how arrays split;
    the checkpoint's params should already be restored into it (sharding.mesh.load_sharded). None:
    one device."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig = EngineConfig(),
                 layout: Layout | None = None):
        self.checkpoint = checkpoint
        self.model_config = c = checkpoint.config
        self.layout = layout = (layout or Layout.single()).for_model(c)
        self.replicas = R = layout.replicas
        self.tokenizer = checkpoint.tokenizer
        self.max_seq_len = min(config.max_seq_len, c.max_position_embeddings)
        ps = config.page_size
        self.max_pages = math.ceil(self.max_seq_len / ps)
        self.config = config
        self.failed: str | None = None  # why the engine cannot go on (see EngineFault)
        self.clock = clock_for(jax.process_count())
        self._seeds = Seeds(self.clock)
        if config.compilation_cache_dir:
            enable_compilation_cache(os.path.expanduser(config.compilation_cache_dir))
        num_pages = kv_pages(c, checkpoint.dtype, config, R, self._kv_budget())
        self.blocks = BlockManager(num_pages, ps, replicas=R, prefix_caching=config.enable_prefix_caching)
        self.fingerprint = model_fingerprint(c, checkpoint.params, checkpoint.dtype, ps,
                                             replicated=None if layout.mesh.size == 1 else layout.replicated())
        pool_sharding = layout.sharding(POOL_AXES, pool_shape(c, num_pages, ps))
        self.pool = sharded_zeros_pool(c, num_pages, ps, checkpoint.dtype, pool_sharding)
        self.page_bytes = page_bytes(c, ps, checkpoint.dtype)  # one page, every layer, keys and values
        self.host_tier = self._mover = None
        self.kv_events = KVEvents() if config.enable_prefix_caching else None
        self.blocks.events = self.kv_events
        if config.host_kv_bytes or config.kv_store:
            self._mover = PageMover(self.pool, None)
            store = None
            if config.kv_store:
                try:
                    store = StoreTier(os.path.expanduser(config.kv_store), self._mover.page_shape,
                                      checkpoint.dtype, events=self.kv_events)
                except Exception as e:
                    raise ConfigError(f"kv_store {config.kv_store!r} cannot be opened: {e}") from None
            host = HostTier(config.host_kv_bytes, self.page_bytes, events=self.kv_events)
            self.host_tier = self._mover.tier = LowerTiers(host, store, config.kv_store_write_through)
            self.blocks.keep_evicted = True
        self._copies = self._mover  # page copy programs for export and import, when asked for
        if self._copies is None and config.kv_transfer:
            self._copies = PageMover(self.pool, None)
        self.scheduler = Scheduler(config.scheduler_config(), self.blocks, salt=self.fingerprint,
                                   lower_tier=self.host_tier)
        if config.decode_buckets and any(b % R for b in config.decode_buckets):
            raise ConfigError(f"decode_buckets must be multiples of the data replicas ({R})")
        self.buckets = engine_buckets(config, self.max_pages, R)
        t0 = time.perf_counter()
        self.attention = config.attention or Target.of(layout.mesh.devices.flat[0]).attention
        if (self.attention == "pallas" and layout.axis("q_heads") is not None
                and layout.axis("kv_heads") is None):
            raise ConfigError(f"attention: pallas needs kv heads split like q heads; {c.num_kv_heads} kv "
                              f"heads do not split over {layout.describe()} (use attention: reference)")
        self.programs = Programs(c, checkpoint.params, self.pool, self.buckets, config.compile_threads,
                                 attention=self.attention, layout=layout,
                                 cache_dir=os.path.expanduser(config.compilation_cache_dir)
                                 if config.compilation_cache_dir else None)
        self.runner = ModelRunner(self.programs, self.buckets, self.blocks, ps)
        self.compile_seconds = time.perf_counter() - t0
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.eos_ids = frozenset(c.eos_token_ids) | frozenset(self.tokenizer.eos_ids)
        self.idle = True  # the last step had nothing to run: a driver may sleep until a new command
        self._pending: list | None = None  # the last step's calls, dispatched, not yet read back

    def _kv_budget(self) -> int:
        if self.config.kv_cache_bytes is not None:
            return self.config.kv_cache_bytes
        device = self.layout.mesh.devices.flat[0]
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            raise ConfigError("this device reports no free memory: set kv_cache_bytes")
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        # the pool is split over data replicas and (when kv heads split) over tensor shards
        layout = self.layout
        split = layout.size(layout.axis("pages")) * layout.size(layout.axis("kv_heads"))
        return int(free * self.config.kv_cache_memory_fraction * split)

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: str | Seq[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None, priority: int = 0,
                    queue_timeout_s: float | None = None, arrival: float | None = None,
                    fork_of: str | None = None) -> str:
        """Queue a request; raises RequestError (bad input) or QueueFullError, leaving others as
        they were. `queue_timeout_s` overrides the configured queue timeout for this request;
        `arrival` (time.monotonic(), the engine's clock in one process; default now) is when its
        caller received it: queue time and the queue timeout count from there.

        `fork_of`: another sample of that request's prompt (n > 1). It waits until that prompt is
        computed, then takes its pages from the prefix cache (shared, ref-counted) and computes only
        the prompt's last partial page: n samples cost one prefill, not n."""
        self._check_alive()
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise RequestError("prompt token ids must be integers") from None
        self.validate_request(ids, params, priority)
        if queue_timeout_s is not None and not queue_timeout_s > 0:
            raise RequestError(f"queue_timeout_s must be positive, got {queue_timeout_s}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise RequestError(f"request_id {rid!r} is already in use")
        seq = Sequence(rid, ids, len(ids), priority=priority,
                       arrival=self.clock.now() if arrival is None else arrival, queue_timeout_s=queue_timeout_s)
        seed = params.seed if params.seed is not None else self._seeds.for_request(rid)
        text = TextStream(self.tokenizer, params.stop) if params.detokenize else NoText()
        req = _Request(seq, params, seed, text, frozenset(params.stop_token_ids))
        if params.prompt_logprobs is not None:
            req.prompt_scores = []
            seq.reuse_prefix = False  # every prompt position's logits are needed: compute them all
        if fork_of is not None and fork_of in self._requests and self._requests[fork_of].fork_of is None:
            req.fork_of = fork_of  # held here, not queued, until the prompt's pages are cached
            seq.reuse_prefix = True  # (its prompt scores, if asked, come from the original)
        else:
            try:
                self.scheduler.add(seq)
            except QueueFull as e:
                raise QueueFullError(str(e)) from None
        self._requests[rid] = req
        return rid

    def validate_request(self, ids: Seq[int], params: SamplingParams, priority: int = 0) -> None:
        """Raise RequestError naming the first problem with this request."""
        check_request(ids, params, priority, vocab_size=self.model_config.vocab_size,
                      max_seq_len=self.max_seq_len, priority_levels=self.config.priority_levels,
                      limits=self.config.limits, eos_ids=len(self.eos_ids))

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its pages are free when this returns. False if unknown or done."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req.seq)
        return True

    def _release_forks(self) -> None:
        """Queue held forks whose prompt is computed (or whose original left): they find its pages.
        They were admitted with their original, so they go in whatever the queue holds, and wait
        from now; they take its prompt scores, or compute their own if it left before it had them."""
        for req in [r for r in self._requests.values() if r.fork_of is not None]:
            parent = self._requests.get(req.fork_of)
            if parent is None or parent.seq.num_computed >= parent.seq.prompt_len:
                req.fork_of = None
                if req.prompt_scores is not None:
                    if parent is not None and parent.prompt_scores is not None and not parent.scoring:
                        req.prompt_scores = list(parent.prompt_scores)
                    else:
                        req.seq.reuse_prefix = False
                self.scheduler.add(req.seq, now=self.clock.now(), over_limit=True)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def next_expiry(self) -> float | None:
        """Clock time at which a waiting request will expire (a driver sleeping on an idle engine
        wakes then)."""
        return self.scheduler.next_expiry()

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise EngineFault(f"the engine failed and cannot serve: {self.failed}")

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Plan, build on the host, dispatch to the device, read the last step's results (or this
        one's, without async scheduling), commit the plan. Faults of
        one request end that request; any other fault from here on is fatal (EngineFault): the plan
        has taken pages and maybe dispatched programs, so nothing about the state can be trusted."""
        self._check_alive()
        try:
            return self._step()
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            log.critical("engine step failed: %s", self.failed)
            raise EngineFault(f"the engine failed: {self.failed}") from e

    def _step(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, None
        self._release_forks()
        plan = self.scheduler.schedule(self.clock.now())
        outputs = [self._finish(self._requests.pop(s.request_id), "rejected",
                                 error=f"queue timeout: waited more than "
                                       f"{s.queue_timeout_s or self.config.queue_timeout_s} s")
                    for s in plan.expired]
        if pending is not None and self._needs_tokens(plan, pending):
            outputs += self._resolve(pending)  # read the last step back first (it may end requests
            pending = None  # of this plan: they are left out of its calls)
        calls, dropped = self.runner.build(plan, self._sampling_of)
        for seq, e in dropped.items():
            log.error("request %s failed while its step was built: %s: %s", seq.request_id, type(e).__name__, e)
            outputs.append(self._finish(self._requests.pop(seq.request_id), "error",
                                        error=f"{type(e).__name__}: {e}"))
        if plan.empty and not plan.onboard:
            if pending is not None:
                outputs += self._resolve(pending)
            self.idle = plan.empty and not outputs
            return outputs
        self.idle = False
        launched = self._run_on_device(plan, calls)
        if pending is not None:  # the device runs this step while the host reads the last one
            outputs += self._resolve(pending)
        self.scheduler.commit(plan)  # after the last step's tokens are known: full pages are hashed
        if self.config.async_scheduling:
            self._pending = launched if self._awaited(launched) else None
        else:
            outputs += self._resolve(launched)
        return outputs

    def _run_on_device(self, plan, calls) -> list:
        """Copies between tiers, then every program call, dispatched, not waited for; each sampling
        row's next token is PENDING on the host until `_resolve` reads it back."""
        if self._mover is not None:  # copies out and in go ahead of this step's programs (in that
            evicted = self.blocks.take_evicted()  # order: an evicted page may be a copy's target)
            if evicted:
                self._mover.offload(self.pool, evicted)
            if plan.onboard:
                self.pool = self._mover.onboard(self.pool, list(plan.onboard))
        self.pool, launched = self.runner.run(self.checkpoint.params, self.pool, calls)
        if self._mover is not None:
            self._mover.finish_offload()
        steps = []
        for call, sampled, scored in launched:
            marks = []
            for row, seq in call.rows:
                marks.append((row, seq, len(seq.tokens)))
                seq.tokens.append(PENDING)
            steps.append((call, marks, sampled, scored))
        return steps

    @staticmethod
    def _awaited(steps: list) -> bool:
        """Whether a dispatched step has a result anyone still waits for (a step that ran only for
        requests that ended meanwhile is dropped unread)."""
        return any(seq.status is not Status.FINISHED
                   for call, marks, _, _ in steps
                   for seq in (*(seq for _, seq, _ in marks), *(seq for _, seq, _, _ in call.scored)))

    def _needs_tokens(self, plan, pending) -> bool:
        """Whether building `plan` needs tokens the last step has not given back yet: a prompt
        chunk over one (a request preempted since) or a penalized row's history. A decode's own
        input token does not: its row reads it on the device."""
        waiting = {seq for _, marks, _, _ in pending for _, seq, _ in marks}
        if any(chunk.seq in waiting for chunk in plan.prefills):
            return True
        for seq in plan.decodes:
            req = self._requests.get(seq.request_id)
            if seq in waiting and req is not None and req.params.penalized:
                return True
        return False

    def _resolve(self, steps: list) -> list[RequestOutput]:
        """Read a dispatched step's results back (waiting for the device) and act on them: tokens,
        prompt scores, stop conditions."""
        outputs = []
        results = jax.device_get([(sampled, scored if call.scored else None) for call, _, sampled, scored in steps])
        for (call, marks, _, _), (sampled, scored) in zip(steps, results):
            tokens = sampled.tokens.tolist()  # Python ints at once, not one numpy scalar per row
            for at, seq, start, count in call.scored:
                req = self._requests.get(seq.request_id)
                self._keep_scores(req if req is not None and req.seq is seq else None, scored, at, start, count)
            for row, seq, index in marks:
                req = self._requests.get(seq.request_id)
                if req is None or req.seq is not seq:
                    continue  # aborted, or ended by an error, while its step ran
                try:
                    outputs.append(self._accept(req, sampled, tokens[row], row, index))
                except Exception as e:  # a fault in one request's results ends that request only
                    self._requests.pop(seq.request_id, None)
                    outputs.append(self._finish(req, "error", error=f"{type(e).__name__}: {e}"))
        return outputs

    def _sampling_of(self, seq: Sequence) -> tuple[SamplingParams, int, bool, tuple[int, ...]]:
        req = self._requests[seq.request_id]
        params = req.params
        held = ()
        if len(seq.tokens) - seq.prompt_len < params.min_tokens:  # nothing may end it yet
            held = tuple(sorted(req.stop_ids | (frozenset() if params.ignore_eos else self.eos_ids)))
        return params, req.seed, req.scoring, held

    def _keep_scores(self, req: _Request | None, scored, at: tuple[int, int], start: int, count: int) -> None:
        """File a chunk's prompt scores (positions start… score prompt tokens start + 1…; in Scored
        from index `at` on): the part not filed yet (a recomputation after preemption may cut the
        prompt into other chunks)."""
        if req is None or not req.scoring or not start <= len(req.prompt_scores) < start + count:
            return  # gone, done, or nothing new
        n, seq = req.params.prompt_logprobs, req.seq
        b, o = at
        for k in range(len(req.prompt_scores) - start, count):
            top = tuple((int(i), float(v)) for i, v in zip(scored.top_ids[b, o + k, :n],
                                                           scored.top_logprobs[b, o + k, :n]))
            req.prompt_scores.append(TokenLogprob(seq.tokens[start + k + 1], float(scored.logprob[b, o + k]), top))
        if not req.scoring:
            seq.reuse_prefix = True  # a recomputation may take cached pages now

    @staticmethod
    def _prompt_logprobs(req: _Request, generated: int) -> tuple[TokenLogprob | None, ...]:
        """The prompt's scores with the first generated token: (None, scores of tokens 1…)."""
        return (None, *req.prompt_scores) if req.prompt_scores is not None and generated == 1 else ()

    # ---- results -------------------------------------------------------------------------------

    def _accept(self, req: _Request, sampled, token: int, row: int, index: int) -> RequestOutput:
        """`token`, row `row` of `sampled`, is the one at `index` of req's tokens (PENDING until
        now; a token after it, if any, is the next step's, still running)."""
        seq, params = req.seq, req.params
        seq.tokens[index] = token
        generated = index + 1 - seq.prompt_len
        scores = self._prompt_logprobs(req, generated)
        logprobs = ()
        if params.logprobs is not None:
            top = tuple((int(i), float(lp)) for i, lp in zip(sampled.top_ids[row, :params.logprobs],
                                                             sampled.top_logprobs[row, :params.logprobs]))
            logprobs = (TokenLogprob(token, float(sampled.logprob[row]), top),)
        if (token in self.eos_ids and not params.ignore_eos) or token in req.stop_ids:
            # the stop token ends the output and is not part of it; its logprob is still reported
            # (last), as OpenAI-style scoring counts one entry per sampled token
            return self._finish(self._requests.pop(seq.request_id), "stop", drop_last=True, logprobs=logprobs,
                                prompt_logprobs=scores)
        text = req.text.push(token, stops=generated >= params.min_tokens)
        if req.text.stopped_by is not None:
            return self._finish(self._requests.pop(seq.request_id), "stop", last=(token,), text=text,
                                logprobs=logprobs, prompt_logprobs=scores)
        if generated >= params.max_tokens or index + 1 >= self.max_seq_len:
            return self._finish(self._requests.pop(seq.request_id), "length", last=(token,), text=text,
                                logprobs=logprobs, prompt_logprobs=scores)
        return RequestOutput(seq.request_id, (token,), text, logprobs=logprobs,
                             prompt_tokens=seq.prompt_len, completion_tokens=generated,
                             queue_time_s=_queue_time(seq), cached_tokens=min(seq.num_cached, seq.prompt_len),
                             prompt_logprobs=scores)

    def _finish(self, req: _Request, reason: str, *, last: tuple[int, ...] = (), text: str = "",
                logprobs=(), error: str | None = None, drop_last: bool = False,
                prompt_logprobs=()) -> RequestOutput:
        seq = req.seq
        self.scheduler.remove(seq)  # pages back to the pool in this same step
        while seq.tokens and seq.tokens[-1] == PENDING:  # the next step's token: never given
            seq.tokens.pop()
        if drop_last:  # EOS / stop token: ends the output, is not part of it
            seq.tokens.pop()
        tail = req.text.finish() if reason not in ("rejected", "error") else ""
        return RequestOutput(seq.request_id, last, text + tail, finished=True, finish_reason=reason,
                             error=error, logprobs=logprobs, prompt_tokens=seq.prompt_len,
                             completion_tokens=len(seq.tokens) - seq.prompt_len, queue_time_s=_queue_time(seq),
                             cached_tokens=min(seq.num_cached, seq.prompt_len), prompt_logprobs=prompt_logprobs)

    # ---- offline -------------------------------------------------------------------------------

    def generate(self, prompts: Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] = SamplingParams(),
                 on_output=None) -> list[Completion]:
        """Run every prompt to completion, feeding the queue as space frees; results in order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError("one SamplingParams per prompt, or one for all")
        todo = list(enumerate(prompts))
        ids: dict[str, int] = {}
        tokens: dict[int, list[int]] = {}
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        done: dict[int, Completion] = {}
        prompt_ids: dict[int, tuple[int, ...]] = {}
        while todo or self.has_unfinished:
            while todo and len(self.scheduler.waiting) < self.config.max_queue_size:
                i, prompt = todo.pop(0)
                rid = self.add_request(prompt, params_list[i])
                ids[rid] = i
                prompt_ids[i] = tuple(self._requests[rid].seq.tokens)
                tokens[i], texts[i], logprobs[i] = [], [], []
            for out in self.step():
                if out.request_id not in ids:
                    continue
                i = ids[out.request_id]
                tokens[i].extend(out.token_ids)
                texts[i].append(out.text)
                logprobs[i].extend(out.logprobs)
                if on_output is not None:
                    on_output(out)
                if out.finished:
                    done[i] = Completion(out.request_id, prompt_ids[i], tuple(tokens[i]),
                                         "".join(texts[i]), out.finish_reason, tuple(logprobs[i]))
        return [done[i] for i in range(len(prompts))]

    # ---- disaggregated prefill and decode (runtime/kv_transfer.py) ------------------------------

    def held_prefix(self, ids: Seq[int]) -> int:
        """How many of the prompt's first reusable pages this engine holds on its device."""
        return len(self.blocks.lookup(self.scheduler.prefix_hashes(list(ids))))

    def _copier(self) -> PageMover:
        if self._copies is None:
            raise ConfigError("moving KV pages needs kv_transfer: true in the engine config")
        return self._copies

    def export_prompt(self, ids: Seq[int], skip: int = 0) -> KVPages:
        """The prompt's reusable pages from page `skip` on, as far as this engine holds them, copied
        out of the pool now (call it when the request's prompt is computed: its pages are cached
        until evicted)."""
        self._check_alive()
        copier, hashes = self._copier(), self.scheduler.prefix_hashes(list(ids))
        pages = self.blocks.lookup(hashes)[skip:]
        arrays = tuple(copier.gather(self.pool, pages[i:i + TRANSFER_PAGES])
                       for i in range(0, len(pages), TRANSFER_PAGES))
        return KVPages(tuple(hashes[skip:skip + len(pages)]), skip, arrays, self.fingerprint.hex())

    def import_prompt(self, ids: Seq[int], pages: KVPages) -> int:
        """Write another engine's pages of this prompt into this pool and make them findable in the
        prefix cache (unreferenced: a request admitted next takes them; eviction may take them
        first, and the request then computes them). Pages already held are skipped. Returns how many
        were written. TransferError when the pages are another model's or another prompt's."""
        self._check_alive()
        copier, ids = self._copier(), list(ids)
        if pages.fingerprint != self.fingerprint.hex():
            raise TransferError(f"KV pages of another model (fingerprint {pages.fingerprint[:16]}, this "
                                f"engine {self.fingerprint.hex()[:16]})")
        hashes = self.scheduler.prefix_hashes(ids)
        end = pages.first + len(pages.hashes)
        if tuple(hashes[pages.first:end]) != pages.hashes:
            raise TransferError("the KV pages are not this prompt's")
        held = self.blocks.lookup(hashes)
        if len(held) < pages.first:
            raise TransferError(f"the KV pages start at page {pages.first}, but this engine holds only "
                                f"the prompt's first {len(held)}")
        if len(held) >= end:
            return 0
        ps, table = self.config.page_size, list(held)
        self.blocks.share(held)  # not evicted to make room for the pages that follow them
        try:
            if not self.blocks.grow(table, end * ps):
                raise TransferError(f"no room for {end - len(held)} KV pages")
            for b, data in enumerate(pages.arrays):  # row r of array b is the prompt's page first + b·TP + r
                first = pages.first + b * TRANSFER_PAGES
                targets = [table[i] if len(held) <= i < end else self.blocks.null_page(0)
                           for i in range(first, min(first + TRANSFER_PAGES, end))]
                self.pool = copier.scatter(self.pool, targets, data)
            for i in range(len(held), end):
                self.blocks.register(table[i], hashes[i], hashes[i - 1] if i else None, ids[i * ps:(i + 1) * ps])
        finally:
            self.blocks.release(table)  # held pages back to as they were; new ones cached, unreferenced
        return end - len(held)

    def drain_kv_events(self) -> list[KVEvent]:
        """Cached-page events since the last call (stored or removed, per tier)."""
        return self.kv_events.drain() if self.kv_events is not None else []

    def evict_prefix_cache(self) -> int:
        """Evict every unreferenced cached page from the device (into the host tier, if any)."""
        self._check_alive()
        n = self.blocks.evict_all_cached()
        if self._mover is not None:
            self._mover.offload(self.pool, self.blocks.take_evicted())
            self._mover.finish_offload()
        return n

    def persist_prefix_cache(self) -> int:
        """Push every cached page down to the store tier (on shutdown: a restart on the same store
        finds them); returns how many of the cached pages (device and host) the store holds
        afterwards, counted there. Pages in use stay where they are. Never after a fault: the
        device pages may hold anything."""
        self._check_alive()
        tiers = self.host_tier
        if tiers is None or tiers.store is None:
            return 0
        cached = set(self.blocks.cached_hashes()) | {h for h, _ in tiers.host.items()}
        self.evict_prefix_cache()
        tiers.persist()
        return sum(h in tiers.store for h in cached)

    def stats(self) -> dict[str, Any]:
        tiers = {}
        if self._mover is not None:
            t = self.host_tier
            tiers = {"pages_host": len(t.host), "host_pages_out": self._mover.pages_out,
                     "host_pages_in": self._mover.pages_in, "host_pages_dropped": t.host.dropped,
                     "host_hit_pages": t.host_hits, "store_hit_pages": t.store_hits}
            if t.store is not None:
                tiers.update(pages_store=len(t.store), store_pages_written=t.store.stored,
                             store_misses=t.store.misses, store_enabled=t.store.enabled)
        return {**self.scheduler.describe(), **tiers, "programs": len(self.programs),
                "compile_seconds": round(self.compile_seconds, 2)}


def _queue_time(seq: Sequence) -> float | None:
    return None if seq.scheduled_at is None else seq.scheduled_at - seq.arrival
