"""Who runs in the next engine step, and on how many tokens. Plain Python: no JAX here.

Each step the scheduler makes a frozen `StepPlan`:
  1. waiting requests past their queue timeout are expired (Triton's `default_queue_policy`);
  2. every running request whose prompt is done gets its next token (a decode), a page added when
     it crosses a page boundary;
  3. the rest of the per-step token budget goes to prompt chunks (chunked prefill): first requests
     already part-way through their prompt, then waiting ones, best priority then oldest first.
When pages run out, the running request that is least entitled (worst priority, newest) is
preempted: its pages are freed and it goes back to the queue, to recompute prompt + output so far.

With prefix caching, a request starting from scratch first takes the cached pages of its longest
cached prefix (at least one token is always left to compute: its logits give the next token).

A plan commits only after it ran. `schedule` allocates pages (a request owns them at once), but
what a step promises to others — pages registered as cached under their hashes, and so the KV
events a router sees, and each request's progress — becomes visible in `commit`, which the engine
calls once the step's programs succeeded. A step that fails leaves no cached page that was never
written.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from meshserve.runtime.block_manager import BlockManager, chain_hash


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class QueueFull(Exception):
    """The waiting queue is at max_queue_size."""


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    priority: int = 0  # lower is served first
    arrival: float = 0.0
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    started: bool = False  # ran at least once
    queue_timeout_s: float | None = None  # overrides SchedulerConfig.queue_timeout_s
    num_preemptions: int = 0
    scheduled_at: float | None = None  # when first admitted (queue time = scheduled_at - arrival)
    num_cached: int = 0  # prompt tokens whose K/V came from the prefix cache (last admission)
    page_hashes: list[bytes] = dataclasses.field(default_factory=list)  # of its full pages, in order
    num_registered: int = 0  # its first pages findable in the prefix cache
    queued_at: float = 0.0  # when it last entered the waiting queue (arrival, or its preemption)
    reuse_prefix: bool = True  # may start from cached pages (not while its prompt is being scored)

    @property
    def uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def order(self) -> tuple:
        return (self.priority, self.arrival)


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # compute tokens[start:end]
    end: int

    @property
    def samples(self) -> bool:
        """The chunk ends the known tokens, so its last logits give the next token."""
        return self.end == len(self.seq.tokens)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    prefills: tuple[PrefillChunk, ...] = ()
    decodes: tuple[Sequence, ...] = ()  # one new token each, at position num_computed
    preempted: tuple[Sequence, ...] = ()
    expired: tuple[Sequence, ...] = ()
    onboard: tuple[tuple[int, bytes], ...] = ()  # (device page, hash): copy in from the lower tier first

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512  # per step, decodes included
    max_prefill_chunk: int = 512  # the largest prefill program
    max_queue_size: int = 256
    queue_timeout_s: float | None = None
    priority_levels: int = 3
    onboard_page_cost: int = 2  # step-budget tokens a page copied in from a lower tier counts for
    # While some request is decoding, a step computes at most this many prompt tokens (None: no
    # limit but the step budget): a long prompt then arrives in small chunks and the streams keep
    # their pace between tokens, at the cost of that prompt's time to first token.
    prefill_tokens_while_decoding: int | None = None

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "max_queue_size",
                     "priority_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (each decode takes one)")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be positive or null, got {self.queue_timeout_s}")
        if self.prefill_tokens_while_decoding is not None and self.prefill_tokens_while_decoding < 1:
            raise ValueError(f"prefill_tokens_while_decoding must be >= 1 or null, "
                             f"got {self.prefill_tokens_while_decoding}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, salt: bytes = b"", lower_tier=None):
        self.config = config
        self.blocks = blocks
        self.salt = salt  # names the model: its pages never match another model's
        self.lower_tier = lower_tier  # `hash in lower_tier`: pages the engine can copy back in
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache …
        self.prefix_hits = 0  # … and found on the device
        self.lower_hits = 0  # … and found in the lower tier
        self._onboard: list[tuple[int, bytes]] = []
        self.waiting: list[Sequence] = []  # kept sorted by (priority, arrival)
        self.running: list[Sequence] = []

    # ---- requests in and out ----------------------------------------------------------------

    def add(self, seq: Sequence, now: float | None = None, over_limit: bool = False) -> None:
        """Queue `seq`, waiting from `now` (default: its arrival). `over_limit`: even into a full
        queue (a request whose admission was already decided, e.g. a held fork)."""
        if len(self.waiting) >= self.config.max_queue_size and not over_limit:
            raise QueueFull(f"the waiting queue is full ({self.config.max_queue_size} requests)")
        self._enqueue(seq, seq.arrival if now is None else now)

    def _enqueue(self, seq: Sequence, now: float) -> None:
        seq.status = Status.WAITING
        seq.queued_at = now
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].order > seq.order:
            i -= 1
        self.waiting.insert(i, seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out (finished or aborted); its pages are free on return."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.pages)
        seq.status = Status.FINISHED

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan:
        expired = self._expire(now)
        preempted: list[Sequence] = []
        decodes: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        budget = self.config.max_num_batched_tokens
        prompt_budget = budget  # prompt tokens this step
        limit = self.config.prefill_tokens_while_decoding
        if limit is not None and any(s.uncomputed == 1 for s in self.running if s.status is Status.RUNNING):
            prompt_budget = limit

        # Running requests, most entitled first, so preemption takes from the tail.
        self.running.sort(key=lambda s: s.order)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = 1 if seq.uncomputed == 1 else min(seq.uncomputed, budget - len(self._decodes_left(seq)),
                                                  prompt_budget, self.config.max_prefill_chunk)
            if n <= 0:
                continue
            if not self._make_room(seq, seq.num_computed + n, preempted, now):
                continue  # seq itself was preempted
            if n == 1 and seq.uncomputed == 1:
                decodes.append(seq)
            else:
                prefills.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
                prompt_budget -= n
            budget -= n

        # Admit waiting requests while there is budget, a free slot, and pages (no preemption for
        # newcomers: that would only trade one request's progress for another's).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq in preempted:
                break  # just preempted for lack of pages: not back in this step
            if self.blocks.prefix_caching and seq.reuse_prefix and seq.num_computed == 0 and not seq.pages:
                budget -= self._reuse_prefix(seq, budget)
                if budget <= 0:
                    break
            n = 1 if seq.uncomputed == 1 else min(seq.uncomputed, budget, prompt_budget, self.config.max_prefill_chunk)
            if n <= 0:
                break  # no prompt tokens left this step
            if not self.blocks.grow(seq.pages, seq.num_computed + n):
                if seq.num_cached:  # give the prefix back; it is looked up again next time
                    given_back = set(seq.pages)
                    self._onboard = [(p, h) for p, h in self._onboard if p not in given_back]
                    self.blocks.release(seq.pages)
                    seq.num_computed = seq.num_cached = seq.num_registered = 0
                    seq.page_hashes = []
                break
            self.waiting.pop(0)
            if not seq.started:
                seq.scheduled_at = now
            seq.status, seq.started = Status.RUNNING, True
            self.running.append(seq)
            if n == 1 and seq.uncomputed == 1:
                decodes.append(seq)
            else:
                prefills.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
                prompt_budget -= n
            budget -= n
        onboard, self._onboard = tuple(self._onboard), []
        return StepPlan(tuple(prefills), tuple(decodes), tuple(preempted), tuple(expired), onboard)

    def commit(self, plan: StepPlan) -> None:
        """The plan's programs ran: its requests advance, and the pages they filled (or copied in
        from a lower tier) become findable. Requests that left the plan before it ran (finished
        with an error) are skipped."""
        for chunk in plan.prefills:
            if chunk.seq.status is Status.RUNNING:
                chunk.seq.num_computed = chunk.end
                self._register_full_pages(chunk.seq)
        for seq in plan.decodes:
            if seq.status is Status.RUNNING:
                seq.num_computed += 1
                self._register_full_pages(seq)

    def prefix_hashes(self, tokens) -> list[bytes]:
        """Names of the pages of `tokens` a request may take from the cache: every full page but
        one that holds the last token (at least one token is always computed: its logits give the
        next token). Each chains its predecessor's, from the model's salt."""
        ps = self.blocks.page_size
        hashes, parent = [], self.salt
        for i in range((len(tokens) - 1) // ps):
            parent = chain_hash(parent, tokens[i * ps:(i + 1) * ps])
            hashes.append(parent)
        return hashes

    def _reuse_prefix(self, seq: Sequence, budget: int) -> int:
        """Take seq's cached prefix; returns the step budget its copies from the lower tier use (each
        page costs `onboard_page_cost` tokens: loading is cheaper than computing, not free)."""
        ps = self.blocks.page_size
        hashes = self.prefix_hashes(seq.tokens)
        full = len(hashes)
        pages = self.blocks.lookup(hashes)
        self.prefix_queries += full * ps
        if pages:
            self.blocks.share(pages)
            seq.pages = list(pages)
            seq.num_computed = seq.num_cached = len(pages) * ps
            seq.page_hashes = hashes[:len(pages)]
            seq.num_registered = len(pages)
            self.prefix_hits += len(pages) * ps
        if self.lower_tier is None:
            return 0
        cost = self.config.onboard_page_cost
        coming = {h for _, h in self._onboard}  # copied in for another request this step: not findable yet
        lower = []
        for h in hashes[len(pages):]:
            if (len(lower) + 1) * cost >= budget or h in coming or h not in self.lower_tier:
                break  # the rest is computed, or loaded in a later admission
            lower.append(h)
        if not lower:
            return 0
        table = list(seq.pages)
        if not self.blocks.grow(table, (len(pages) + len(lower)) * ps):
            return 0  # no room to bring them in: compute instead
        for page, h in zip(table[len(pages):], lower):  # registered in `commit`, once copied in
            self._onboard.append((page, h))
        seq.pages = table
        seq.num_computed = seq.num_cached = len(table) * ps
        seq.page_hashes = hashes[:len(table)]
        self.lower_hits += len(lower) * ps
        return len(lower) * cost

    def _register_full_pages(self, seq: Sequence) -> None:
        """Register the pages that hold computed tokens in full (and those copied in for it)."""
        if not self.blocks.prefix_caching:
            return
        ps = self.blocks.page_size
        for i in range(len(seq.page_hashes), seq.num_computed // ps):
            parent = seq.page_hashes[-1] if seq.page_hashes else self.salt
            seq.page_hashes.append(chain_hash(parent, seq.tokens[i * ps:(i + 1) * ps]))
        for i in range(seq.num_registered, len(seq.page_hashes)):
            self.blocks.register(seq.pages[i], seq.page_hashes[i], seq.page_hashes[i - 1] if i else None,
                                 seq.tokens[i * ps:(i + 1) * ps])
        seq.num_registered = len(seq.page_hashes)

    def _decodes_left(self, seq: Sequence) -> list[Sequence]:
        """Running requests after `seq` that will want one decode token each this step: a prompt
        chunk must leave them their token."""
        i = self.running.index(seq)
        return [s for s in self.running[i + 1:] if s.status is Status.RUNNING and s.uncomputed == 1]

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence], now: float) -> bool:
        """Grow seq's pages to num_tokens, preempting from the tail of `running` as needed.
        False if seq itself had to be preempted."""
        while not self.blocks.grow(seq.pages, num_tokens):
            # the least entitled request holding pages of seq's data replica (seq itself at worst)
            replica = self.blocks.replica_of(seq.pages[0]) if seq.pages else None
            victim = next(s for s in reversed(self.running)
                          if s is seq or replica is None
                          or (s.pages and self.blocks.replica_of(s.pages[0]) == replica))
            self._preempt(victim, now)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, now: float) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.pages)
        seq.num_computed = seq.num_cached = seq.num_registered = 0  # recompute prompt + output so far
        seq.page_hashes = []
        seq.num_preemptions += 1
        self._enqueue(seq, now)

    def _timeout(self, seq: Sequence) -> float | None:
        return seq.queue_timeout_s if seq.queue_timeout_s is not None else self.config.queue_timeout_s

    def _expire(self, now: float) -> list[Sequence]:
        """Waiting requests past their queue timeout, counted from when they last entered the queue
        (a preempted request that cannot get back in expires too, instead of waiting forever)."""
        expired = [s for s in self.waiting
                   if self._timeout(s) is not None and now - s.queued_at > self._timeout(s)]
        for seq in expired:
            self.remove(seq)
        return expired

    def next_expiry(self) -> float | None:
        """The clock reading at which the next waiting request expires (None: none can)."""
        times = [s.queued_at + self._timeout(s) for s in self.waiting if self._timeout(s) is not None]
        return min(times, default=None)

    def describe(self) -> dict[str, Any]:
        return {"waiting": len(self.waiting), "running": len(self.running),
                "pages_used": self.blocks.num_used, "pages_total": self.blocks.num_usable,
                "pages_cached": self.blocks.num_cached, "prefix_queried_tokens": self.prefix_queries,
                "prefix_hit_tokens": self.prefix_hits, "prefix_lower_hit_tokens": self.lower_hits}
