"""The engine: many requests share one device through the paged KV cache and the compiled programs.

    engine = Engine(checkpoint, EngineConfig(...))     # compiles every program, then is ready
    rid = engine.add_request("Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished:
        for out in engine.step(): ...                  # RequestOutput: new tokens and text
    engine.generate(prompts, params)                   # the same, blocking, for offline use

The engine builds the parts and runs the steps; each part owns its state: pages, the KV manager
(runtime/kv_manager.py); who runs and each request's progress and tokens, the scheduler; what the
outputs say, the output processor (runtime/outputs.py); the calls, the model runner. One `step` =
one scheduler plan: its copies between KV tiers, then its prompt chunks in ragged prefill calls and
the decode calls of every request that is generating. The engine is single-threaded; a server
drives it from its own thread (serving/engine_loop.py).

Async scheduling (`EngineConfig.async_scheduling`, on by default): a step is planned, built and
dispatched while the device still runs the one before; only then does the host read that one's
tokens back and act on them (stop conditions, text), so the device does not wait for the host
between steps. A token sampled in step N counts for the request from dispatch (the scheduler's
`sampling`) and joins its tokens when read back (`accept`); step N+1's decode of it reads it on the
device (runner.py's slots). `step` returns step N's outputs from the call that dispatched step N+1.
A request that ends at step N has had a row in step N+1 computed for nothing, whose result is
dropped; an abort between two calls still frees its pages at once (later steps are ordered after
the ones in flight on the device). A step that needs a token still on the device on the host (a
prompt chunk over it after a preemption, a penalized row's history, a constrained row's mask, which
its matcher fills only once it has accepted that token) reads the last step back first.

Speculative decoding (`EngineConfig.speculative`, runtime/speculative.py): before a step is
planned, each running request that may speculate gets drafts from the proposer, which needs its
tokens on the host (the last step is read back first); the step verifies them, and is read back
before it commits, so the request advances by what was accepted and gives back the pages of the
rest. Steps without drafts run as above.

Failure contract:
  - a request that passes `check` never waits for pages that cannot exist, nor for a program that
    was not compiled: the KV cache is checked at start-up to hold one `max_seq_len` request on every
    data replica, and every bucket covers the config's limits;
  - a fault in one request's host work (building its rows, reading its results) ends that request
    with finish reason "error"; the others in the step go on; a page a lower tier cannot give back
    when it is read is computed instead;
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
from typing import Any, Sequence as Seq

import jax
import numpy as np

from meshserve.models.checkpoint import Checkpoint
from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConfigError, MeshserveError, RequestError
from meshserve.runtime import kv_quant, progress
from meshserve.runtime.clock import Seeds, clock_for
from meshserve.runtime.grammar import GrammarCompiler
from meshserve.runtime.config import EngineConfig
from meshserve.runtime.identity import model_fingerprint
from meshserve.runtime.kv_cache import page_bytes, sharded_zeros_pool
from meshserve.runtime.kv_manager import KVManager, Memory, kv_budget, kv_pages
from meshserve.runtime.kv_tiers import TRANSFER_PAGES, KVEvent, KVEvents, PageMover, lower_tiers
from meshserve.runtime.kv_transfer import KVPages, TransferError
from meshserve.runtime.outputs import (Completion, OutputProcessor, RequestOutput, TokenLogprob,  # noqa: F401
                                       Tracked)
from meshserve.runtime.programs import Programs, enable_compilation_cache
from meshserve.runtime.request import Request, check_request
from meshserve.runtime.runner import ModelRunner
from meshserve.runtime.sampling import Sampled, SamplingParams
from meshserve.runtime.scheduler import QueueFull, Scheduler, Sequence, Status
from meshserve.runtime.speculative import Speculator
from meshserve.runtime.target import Target
from meshserve.runtime.text import NoText, TextStream
from meshserve.sharding.rules import Layout

log = logging.getLogger("meshserve.engine")


class QueueFullError(MeshserveError):
    """The waiting queue is full (gRPC: RESOURCE_EXHAUSTED)."""


def kv_pool_bytes(config: EngineConfig, model: ModelConfig, page_bytes: int, max_seq_len: int, layout: Layout,
                  memory: Memory | None = None) -> int:
    """The KV pool's bytes over the mesh: config.kv_cache_bytes, else what `memory` (one device's;
    default: what the layout's first device reports) leaves (kv_manager.kv_budget), times the devices
    the pool is split over (data replicas, and tensor shards when kv heads split)."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    memory = memory or Memory.of(layout.mesh.devices.flat[0])
    split = layout.size(layout.axis("pages")) * layout.size(layout.axis("kv_heads"))
    return kv_budget(memory, model, page_bytes, config.page_size, max_seq_len=max_seq_len,
                     max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                     replicas=layout.replicas, split=split)


class EngineFault(MeshserveError):
    """The engine cannot go on (a fault after a program was dispatched); every call raises it."""


class Engine:
    """`layout` (sharding.rules.Layout, from a mesh file) says which devices and how arrays split;
    the checkpoint's params should already be restored into it (sharding.mesh.load_sharded). None:
    one device."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig = EngineConfig(),
                 layout: Layout | None = None, memory: Memory | None = None):
        """`memory`: what one device gives the engine (default: what it reports); sizes the KV pool
        when config.kv_cache_bytes is None."""
        self.checkpoint, self.config = checkpoint, config
        self.model_config = c = checkpoint.config
        self.layout = layout = (layout or Layout.single()).for_model(c)
        self.replicas = R = layout.replicas
        self.tokenizer = checkpoint.tokenizer
        self.max_seq_len = min(config.max_seq_len, c.max_position_embeddings)
        ps = config.page_size
        self.max_pages = math.ceil(self.max_seq_len / ps)
        self.failed: str | None = None  # why the engine cannot go on (see EngineFault)
        self.clock = clock_for(jax.process_count())
        self._seeds = Seeds(self.clock)
        if config.compilation_cache_dir:
            enable_compilation_cache(os.path.expanduser(config.compilation_cache_dir))
        self.kv_dtype = kv_quant.cache_dtype(config.kv_cache_dtype, checkpoint.dtype)
        target = Target.of(layout.mesh.devices.flat[0])
        self.attention = config.attention or target.attention
        kv_quant.check_readable(self.kv_dtype, self.attention, target)  # before anything is built
        self.page_bytes = page_bytes(c, ps, self.kv_dtype)  # one page, every layer, keys and values
        draft_pool_bytes = self._check_draft(checkpoint, layout)
        budget = kv_pool_bytes(config, c, self.page_bytes, self.max_seq_len, layout, memory)
        if config.kv_cache_bytes is None:  # sized from memory: the draft model's pool comes out of it
            budget -= draft_pool_bytes
        num_pages = kv_pages(self.page_bytes, ps, self.max_seq_len, R, budget)
        progress.stage(f"KV cache: {num_pages} pages of {ps} tokens ({num_pages * self.page_bytes / 2**30:.2f} GiB"
                       f"{'' if config.kv_cache_bytes else ', sized from memory'}), context {self.max_seq_len}")
        self.fingerprint = model_fingerprint(c, checkpoint.params, self.kv_dtype, ps,
                                             replicated=None if layout.mesh.size == 1 else layout.replicated())
        self.pool = sharded_zeros_pool(c, num_pages, ps, self.kv_dtype, layout)
        self.kv_events = KVEvents() if config.enable_prefix_caching else None
        self.host_tier = lower_tiers(config, self.pool, self.page_bytes, self.kv_events)  # None: no lower tier
        self._copies = None  # page copy programs between the pool and host memory, when needed
        if self.host_tier is not None or config.kv_transfer:
            self._copies = PageMover(self.pool, self.host_tier)
        self.kv = KVManager(num_pages, ps, replicas=R, prefix_caching=config.enable_prefix_caching,
                            salt=self.fingerprint, events=self.kv_events, lower=self.host_tier)
        self.scheduler = Scheduler(config.scheduler_config(), self.kv)
        if config.decode_buckets and any(b % R for b in config.decode_buckets):
            raise ConfigError(f"decode_buckets must be multiples of the data replicas ({R})")
        self.buckets = config.buckets(self.max_pages, R)
        t0 = time.perf_counter()
        if self.attention == "pallas" and layout.axis("q_heads") is not None and layout.axis("kv_heads") is None:
            raise ConfigError(f"attention: pallas needs kv heads split like q heads; {c.num_kv_heads} kv "
                              f"heads do not split over {layout.describe()} (use attention: reference)")
        self.programs = Programs(c, checkpoint.params, self.pool, self.buckets, config.compile_threads,
                                 attention=self.attention, layout=layout,
                                 cache_dir=os.path.expanduser(config.compilation_cache_dir)
                                 if config.compilation_cache_dir else None)
        # structured outputs: constraints compiled against the tokenizer, masks as wide as the logits
        self.grammars = GrammarCompiler(self.tokenizer, c.vocab_size)
        self.runner = ModelRunner(self.programs, self.buckets, self.kv, ps, self.grammars)
        self.compile_seconds = time.perf_counter() - t0
        self.eos_ids = frozenset(c.eos_token_ids) | frozenset(self.tokenizer.eos_ids)
        self.outputs = OutputProcessor(self.scheduler, self.eos_ids, self.max_seq_len)
        self._ids = itertools.count()
        self.idle = True  # the last step had nothing to run: a driver may sleep until a new command
        self._pending: list | None = None  # the last step's calls, dispatched, not yet read back
        # tokens each MoE layer's router sent to each expert, since start-up (router_statistics)
        self.moe_layers = tuple(i for i in range(c.num_layers) if c.is_moe_layer(i))
        self.routing = np.zeros((len(self.moe_layers), c.num_experts), np.int64)
        self.speculator = None
        if config.speculative is not None:
            self.speculator = Speculator(config.speculative, self._draft_model(draft_pool_bytes))
        self._accepted: dict[Sequence, int] = {}  # drafts each verifying request of this step kept

    # ---- speculative decoding's draft model ----------------------------------------------------

    def _check_draft(self, checkpoint: Checkpoint, layout: Layout) -> int:
        """Load a draft model's checkpoint, if speculation asks for one, and check it fits this
        engine (before anything is built); returns its KV pool's bytes (0: none)."""
        spec = self.config.speculative
        self._draft_ckpt = None
        if spec is None or spec.method != "draft_model":
            return 0
        from meshserve.models.checkpoint import load_checkpoint
        from meshserve.runtime.speculative import same_tokenizer

        if layout.mesh.size > 1:
            raise ConfigError("speculative decoding with a draft model runs on one device; this engine's mesh has "
                              f"{layout.mesh.size}")
        try:
            draft = load_checkpoint(os.path.expanduser(spec.model), progress=False)
        except MeshserveError:
            raise
        except Exception as e:
            raise ConfigError(f"speculative.model {spec.model!r}: cannot load the draft checkpoint: {e}") from None
        if not same_tokenizer(draft.tokenizer, checkpoint.tokenizer):
            raise ConfigError(f"the draft model {spec.model!r} ({draft.config.name}, vocabulary "
                              f"{draft.tokenizer.vocab_size}) has another tokenizer than the target "
                              f"{checkpoint.config.name!r} (vocabulary {checkpoint.tokenizer.vocab_size}): drafts "
                              f"would be other tokens")
        self._draft_ckpt = draft
        return page_bytes(draft.config, self.config.page_size, kv_quant.cache_dtype("auto", draft.dtype)) * \
            (self._draft_config().max_num_seqs * self.max_pages + 1)

    def _draft_config(self) -> EngineConfig:
        c = self.config
        seqs = min(c.speculative.disable_by_batch_size, c.max_num_seqs)
        return EngineConfig(page_size=c.page_size, max_seq_len=self.max_seq_len, max_num_seqs=seqs,
                            max_num_batched_tokens=c.max_num_batched_tokens, max_prefill_chunk=c.max_prefill_chunk,
                            max_queue_size=max(seqs, 1), attention=c.attention,
                            compilation_cache_dir=c.compilation_cache_dir, compile_threads=c.compile_threads)

    def _draft_model(self, pool_bytes: int):
        """The draft model's engine (its own pool of `pool_bytes`, its own programs), or None."""
        if self._draft_ckpt is None:
            return None
        from meshserve.runtime.speculative import DraftModel

        progress.stage("the draft model's engine:")
        draft = Engine(self._draft_ckpt, dataclasses.replace(self._draft_config(), kv_cache_bytes=pool_bytes))
        return DraftModel(draft)

    # ---- requests ------------------------------------------------------------------------------

    @property
    def speculative_tokens(self) -> int:
        """The most drafts a request may have verified in one step (0: this engine does not speculate)."""
        return self.speculator.config.num_speculative_tokens if self.speculator is not None else 0

    def check(self, ids: Seq[int], params: SamplingParams = SamplingParams(), priority: int = 0,
              **fields) -> Request:
        """The request checked against this engine's limits (RequestError naming the first problem)."""
        check_request(ids, params, priority, vocab_size=self.model_config.vocab_size, max_seq_len=self.max_seq_len,
                      priority_levels=self.config.priority_levels, limits=self.config.limits,
                      eos_ids=len(self.eos_ids), speculative_tokens=self.speculative_tokens)
        timeout = fields.get("queue_timeout_s")
        if timeout is not None and not timeout > 0:
            raise RequestError(f"queue_timeout_s must be positive, got {timeout}")
        if params.guided is not None:  # compiled here, on the caller's thread (a server's: off the engine's)
            fields["grammar"] = self.grammars.compile(params.guided)
        return Request(tuple(ids), params, priority, **fields)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None, priority: int = 0, queue_timeout_s: float | None = None,
                    arrival: float | None = None, fork_of: str | None = None) -> str:
        """Check and queue a request (a text prompt is tokenized); see `add`."""
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
        return self.add(self.check(ids, params, priority, request_id=request_id, arrival=arrival,
                                   fork_of=fork_of, queue_timeout_s=queue_timeout_s))

    def add(self, request: Request) -> str:
        """Queue a checked request; see `add_all`."""
        return self.add_all([request])[0]

    def add_all(self, requests: Seq[Request]) -> list[str]:
        """Queue one call's checked requests, all or none: its sequences (prompts × samples, forks
        included) count against the queue together. QueueFullError when they do not fit now,
        RequestError when they never could (or for a request id in use); either leaves every other
        request as it was. Queue time and the queue timeout count from a request's `arrival`
        (time.monotonic(), the engine's clock in one process; default now).

        `fork_of`: another sample of that request's prompt (n > 1). It waits until that prompt is
        computed, then takes its pages from the prefix cache (shared, ref-counted) and computes only
        the prompt's last partial page: n samples cost one prefill, not n."""
        self._check_alive()
        limit, queued = self.config.max_queue_size, self.outputs.num_queued()
        if len(requests) > limit:
            raise RequestError(f"{len(requests)} sequences in one call (prompts × n): more than the queue's "
                               f"{limit} places")
        if queued + len(requests) > limit:
            raise QueueFullError(f"the waiting queue is full ({queued} of {limit} places taken; this call needs "
                                 f"{len(requests)})")
        added: list[str] = []
        try:
            for request in requests:
                added.append(self._add(request))
        except Exception:
            for rid in added:
                self.abort(rid)
            raise
        return added

    def _add(self, request: Request) -> str:
        rid = request.request_id if request.request_id is not None else f"req-{next(self._ids)}"
        if rid in self.outputs.requests:
            raise RequestError(f"request_id {rid!r} is already in use")
        params = request.params
        seq = Sequence(rid, list(request.token_ids), len(request.token_ids), priority=request.priority,
                       arrival=self.clock.now() if request.arrival is None else request.arrival,
                       queue_timeout_s=request.queue_timeout_s, max_total=len(request.token_ids) + params.max_tokens)
        seed = params.seed if params.seed is not None else self._seeds.for_request(rid)
        text = TextStream(self.tokenizer, params.stop) if params.detokenize else NoText()
        matcher = None
        if params.guided is not None:
            grammar = request.grammar if request.grammar is not None else self.grammars.compile(params.guided)
            matcher = grammar.matcher()
        try:
            self.outputs.add(Tracked(seq, params, seed, text, frozenset(params.stop_token_ids), matcher=matcher),
                             request.fork_of)
        except QueueFull as e:
            raise QueueFullError(str(e)) from None
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its pages are free when this returns. False if unknown or done."""
        return self.outputs.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.outputs.requests)

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
        one's, without async scheduling), commit the plan. Faults of one request end that request;
        any other fault from here on is fatal (EngineFault): the plan has taken pages and maybe
        dispatched programs, so nothing about the state can be trusted."""
        self._check_alive()
        try:
            return self._step()
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            log.critical("engine step failed: %s", self.failed)
            raise EngineFault(f"the engine failed: {self.failed}") from e

    def _step(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, None
        self.outputs.release_forks(self.clock.now())
        outputs = []
        if self.speculator is not None:
            candidates = self._speculating()
            if candidates and pending is not None and any(seq.num_sampling for seq in candidates):
                outputs += self._resolve(pending)  # the proposer reads their tokens
                pending = None
            self._propose(candidates)
        plan = self.scheduler.schedule(self.clock.now())
        outputs += self.outputs.expired(plan.expired)
        if pending is not None and self._needs_tokens(plan):
            outputs += self._resolve(pending)  # read the last step back first (it may end requests
            pending = None  # of this plan: they are left out of its calls)
        work = not plan.empty
        plan, staged = self._stage_copies_in(plan)
        calls, dropped = self.runner.build(plan, self.outputs.sampling_of)
        outputs += [out for out in (self.outputs.failed(seq, e) for seq, e in dropped.items()) if out is not None]
        if plan.empty and not staged:
            if pending is not None:
                outputs += self._resolve(pending)
            self.idle = not work and not outputs
            return outputs
        self.idle = False
        launched = self._run_on_device(calls, staged)
        if pending is not None:  # the device runs this step while the host reads the last one
            outputs += self._resolve(pending)
        if plan.drafts:  # read back now: the requests advance by the drafts they keep
            outputs += self._resolve(launched)
            self.scheduler.commit(plan, self._accepted)
            self._accepted = {}
            return outputs
        self.scheduler.commit(plan)  # after the last step's tokens are known: full pages are hashed
        if self.config.async_scheduling:
            self._pending = launched if self._awaited(launched) else None
        else:
            outputs += self._resolve(launched)
        return outputs

    def _stage_copies_in(self, plan):
        """Read the pages the plan copies in from the lower tier (host memory, or the store, whose
        reads are checked); a request whose page cannot be read leaves the step and computes it.
        Returns the plan and the (device page, data) to write."""
        staged, failed = [], {}
        for copy in plan.onboard:
            if copy.seq not in failed:
                data = self.host_tier.read(copy.page_hash)
                if data is None:
                    failed[copy.seq] = copy.index
                else:
                    staged.append((copy.page, data))
        if failed:
            plan = self.scheduler.recompute_from(plan, failed)
        return plan, staged

    def _run_on_device(self, calls, staged) -> list:
        """Copies between tiers, then every program call, dispatched, not waited for; each sampling
        row's token counts for its request from now (the scheduler's `sampling`)."""
        if self.host_tier is not None:  # copies out and in go ahead of this step's programs (in that
            evicted = self.kv.take_evicted()  # order: an evicted page may be a copy's target)
            if evicted:
                self._copies.offload(self.pool, evicted)
            if staged:
                self.pool = self._copies.onboard(self.pool, staged)
        self.pool, launched = self.runner.run(self.checkpoint.params, self.pool, calls)
        if self.host_tier is not None:
            self._copies.finish_offload()
        for call, *_ in launched:
            for _, seq in call.rows:
                self.scheduler.sampling(seq)
        return launched

    def _awaited(self, launched: list) -> bool:
        """Whether a dispatched step has a result anyone still waits for (a step that ran only for
        requests that ended meanwhile is dropped unread)."""
        return self.outputs.awaited([seq for call, *_ in launched
                                     for seq in (*(seq for _, seq in call.rows), *(s[1] for s in call.scored))])

    def _needs_tokens(self, plan) -> bool:
        """Whether building `plan` needs tokens still on the device: a prompt chunk over one (a
        request preempted since), a penalized row's history or a constrained row's mask. A
        decode's own input token does not: its row reads it on the device."""
        if any(chunk.end > len(chunk.seq.tokens) for chunk in plan.prefills):
            return True
        return any(seq.num_sampling and (self.outputs.params_of(seq).penalized or self.outputs.constrained(seq))
                   for seq in plan.decodes)

    def _speculating(self) -> list[Sequence]:
        """Running requests that propose drafts this step: while few enough run, those decoding
        with plain sampling that are not skipping a step after a miss."""
        running = [seq for seq in self.scheduler.running if seq.status is Status.RUNNING]
        self.speculator.forget_finished()
        if len(running) > self.speculator.config.disable_by_batch_size:
            return []
        out = []
        for seq in running:
            if seq.uncomputed != 1 or not seq.wants_decode:
                continue
            params, _, _, held, matcher = self.outputs.sampling_of(seq)
            if params.penalized or held or matcher is not None or params.num_speculative_tokens == 0:
                continue
            if self.speculator.wants(seq, params.num_speculative_tokens):
                out.append(seq)
        return out

    def _propose(self, candidates: list[Sequence]) -> None:
        """Drafts for each candidate still decoding, within what its max_tokens and the context leave
        (the verified token after the drafts counts too)."""
        items = []
        for seq in candidates:
            if seq.status is not Status.RUNNING or not seq.wants_decode or seq.num_sampling:
                continue
            room = min(seq.max_total if seq.max_total is not None else self.max_seq_len, self.max_seq_len)
            items.append((seq, room - seq.total - 1))
        for (seq, _), draft in zip(items, self.speculator.propose_all(items)):
            seq.draft = draft

    def _resolve(self, launched: list) -> list[RequestOutput]:
        """Read a dispatched step's results back (waiting for the device) and act on them: tokens,
        prompt scores, stop conditions."""
        outputs = []
        results = jax.device_get([(sampled, scored if call.scored or call.shape[0] == "verify" else None, routing)
                                  for call, sampled, scored, routing in launched])
        for (call, *_), (sampled, scored, routing) in zip(launched, results):
            if routing.size:
                self.routing += routing
            if call.shape[0] == "verify":
                outputs += self._verified(call, sampled, scored)
                continue
            tokens = sampled.tokens.tolist()  # Python ints at once, not one numpy scalar per row
            for at, seq, start, count in call.scored:
                self.outputs.scored(seq, scored, at, start, count)
            for row, seq in call.rows:
                out = self.outputs.sampled(seq, sampled, tokens[row], row)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _verified(self, call, sampled: Sampled, accepted: np.ndarray) -> list[RequestOutput]:
        """A verify call's results: each row's accepted drafts and its own token join the request
        (one output per request); the drafts it kept are noted for the commit."""
        outputs = []
        tokens = sampled.tokens.tolist()
        drafts = call.batch.ints[:, 1]
        at = [Sampled(sampled.tokens[:, j], sampled.logprob[:, j], sampled.top_ids[:, j], sampled.top_logprobs[:, j])
              for j in range(sampled.tokens.shape[1])]  # each position's results, as a decode's
        for row, seq in call.rows:
            kept = int(accepted[row])
            self._accepted[seq] = kept
            self.speculator.record(seq, int(drafts[row]), kept)
            merged = None
            for j in range(kept + 1):
                if j:
                    self.scheduler.sampling(seq)  # the first counted at dispatch
                out = self.outputs.sampled(seq, at[j], tokens[row][j], row)
                if out is None:
                    break
                merged = out if merged is None else _joined(merged, out)
                if out.finished:
                    break
            if merged is not None:
                outputs.append(merged)
        return outputs

    # ---- offline -------------------------------------------------------------------------------

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] = SamplingParams(),
                 on_output=None) -> list[Completion]:
        """Run every prompt to completion, feeding the queue as space frees; results in order."""
        from meshserve.runtime.offline import generate

        return generate(self, prompts, params, on_output)

    # ---- disaggregated prefill and decode (runtime/kv_transfer.py) ------------------------------

    def held_prefix(self, ids: Seq[int]) -> int:
        """How many of the prompt's first reusable pages this engine holds on its device."""
        return len(self.kv.held(list(ids)))

    def _copier(self) -> PageMover:
        if self._copies is None:
            raise ConfigError("moving KV pages needs kv_transfer: true in the engine config")
        return self._copies

    def export_prompt(self, ids: Seq[int], skip: int = 0) -> KVPages:
        """The prompt's reusable pages from page `skip` on, as far as this engine holds them, copied
        out of the pool now (call it when the request's prompt is computed: its pages are cached
        until evicted)."""
        self._check_alive()
        copier = self._copier()
        hashes, pages = self.kv.export_pages(list(ids), skip)
        arrays = tuple(copier.gather(self.pool, pages[i:i + TRANSFER_PAGES])
                       for i in range(0, len(pages), TRANSFER_PAGES))
        return KVPages(tuple(hashes), skip, arrays, self.fingerprint.hex())

    def import_prompt(self, ids: Seq[int], pages: KVPages) -> int:
        """Write another engine's pages of this prompt into this pool and make them findable in the
        prefix cache (unreferenced: a request admitted next takes them; eviction may take them
        first, and the request then computes them). Pages already held are skipped. Returns how many
        were written. TransferError when the pages are another model's or another prompt's."""
        self._check_alive()
        copier = self._copier()
        if pages.fingerprint != self.fingerprint.hex():
            raise TransferError(f"KV pages of another model, KV dtype or page size (fingerprint "
                                f"{pages.fingerprint[:16]}, this engine {self.fingerprint.hex()[:16]})")
        try:
            plan = self.kv.begin_import(list(ids), pages.first, pages.hashes)
        except ValueError as e:
            raise TransferError(str(e)) from None
        if plan is None:
            return 0
        written = False
        try:
            for b, data in enumerate(pages.arrays):  # row r of array b is the prompt's page first + b·TP + r
                at = b * TRANSFER_PAGES
                self.pool = copier.scatter(self.pool, list(plan.targets[at:at + TRANSFER_PAGES]), data)
            written = True
        finally:
            n = self.kv.finish_import(plan, written)
        return n

    def drain_kv_events(self) -> list[KVEvent]:
        """Cached-page events since the last call (stored or removed, per tier)."""
        return self.kv_events.drain() if self.kv_events is not None else []

    def evict_prefix_cache(self) -> int:
        """Evict every unreferenced cached page from the device (into the host tier, if any)."""
        self._check_alive()
        n = self.kv.evict_all_cached()
        if self.host_tier is not None:
            self._copies.offload(self.pool, self.kv.take_evicted())
            self._copies.finish_offload()
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
        cached = set(self.kv.cached_hashes()) | {h for h, _ in tiers.host.items()}
        tiers.persist(push_down=self.evict_prefix_cache)
        return sum(tiers.store.holds(h) for h in cached)

    def router_statistics(self) -> tuple[tuple[int, ...], np.ndarray]:
        """(the MoE layers' indices, int64[layers, experts]): how many tokens each layer's router has
        sent to each expert since start-up, prompts and generated tokens alike (each token counts once
        per expert it picked). What to look at before placing experts."""
        return self.moe_layers, self.routing.copy()

    def stats(self) -> dict[str, Any]:
        tiers = {}
        if self.host_tier is not None:
            t, mover = self.host_tier, self._copies
            tiers = {"pages_host": len(t.host), "host_pages_out": mover.pages_out, "host_pages_in": mover.pages_in,
                     "host_pages_dropped": t.host.dropped, "host_hit_pages": t.host_hits,
                     "store_hit_pages": t.store_hits}
            if t.store is not None:
                tiers.update(pages_store=len(t.store), store_pages_written=t.store.stored,
                             store_misses=t.store.misses, store_pages_evicted=t.store.evicted,
                             store_enabled=t.store.enabled)
        spec = self.speculator.stats() if self.speculator is not None else {}
        return {**self.scheduler.describe(), **tiers, **spec, "programs": len(self.programs),
                "page_size": self.config.page_size,
                "page_bytes": self.page_bytes, "compile_seconds": round(self.compile_seconds, 2)}


def _joined(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two outputs of one request in one step as one (a verify step's several tokens)."""
    return dataclasses.replace(then, token_ids=first.token_ids + then.token_ids, text=first.text + then.text,
                               logprobs=first.logprobs + then.logprobs,
                               prompt_logprobs=first.prompt_logprobs or then.prompt_logprobs)
