"""Who runs in the next engine step, and on how many tokens: policy, and the one place a step's results
are applied to a request. Plain Python: no JAX, no I/O here.

Each step the scheduler makes a frozen `StepPlan`:
  1. waiting requests past their queue timeout are expired (Triton's `default_queue_policy`);
  2. every running request whose prompt is done gets its next token (a decode), a page added when
     it crosses a page boundary — with its drafted tokens, when it has some (speculative decoding:
     the step verifies them, and pages for them are taken as for any token);
  3. the rest of the per-step token budget goes to prompt chunks (chunked prefill): first requests
     already part-way through their prompt, then waiting ones, best priority then oldest first.
When pages run out, the running request that is least entitled (worst priority, newest) is
preempted: its pages are freed and it goes back to the queue, to recompute prompt + output so far.

Pages are the KV manager's (runtime/kv_manager.py): the scheduler asks it for room, for a request's
cached prefix (at least one token is always left to compute: its logits give the next token) and
gives pages back; it never writes a page table itself.

A plan commits only after it ran. `schedule` allocates pages (a request owns them at once), but
what a step promises to others — pages registered as cached under their hashes, and so the KV
events a router sees, and each request's progress — becomes visible in `commit`, which the engine
calls once the step's programs succeeded. A step that fails leaves no cached page that was never
written. A token sampled on the device counts from dispatch (`sampling`: the next step may decode
it, reading it on the device) and joins the request's tokens when read back (`accept`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshserve.runtime.kv_manager import KVManager, Onboard
from meshserve.runtime.sequence import Sequence, Status  # noqa: F401  (the scheduler's requests)


class QueueFull(Exception):
    """The waiting queue is at max_queue_size."""


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # compute tokens[start:end]
    end: int

    @property
    def samples(self) -> bool:
        """The chunk ends the request's tokens, so its last logits give the next token."""
        return self.end == self.seq.total


@dataclasses.dataclass(frozen=True)
class StepPlan:
    prefills: tuple[PrefillChunk, ...] = ()
    decodes: tuple[Sequence, ...] = ()  # one new token each, at position num_computed
    preempted: tuple[Sequence, ...] = ()
    expired: tuple[Sequence, ...] = ()
    onboard: tuple[Onboard, ...] = ()  # pages to copy in from the lower tier first
    drafts: tuple[tuple[Sequence, tuple[int, ...]], ...] = ()  # decodes that verify drafted tokens too

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes)

    def without(self, seqs: set[Sequence]) -> "StepPlan":
        """This plan less the chunks, decodes and copies of `seqs` (they wait for the next step)."""
        return dataclasses.replace(self, prefills=tuple(c for c in self.prefills if c.seq not in seqs),
                                   decodes=tuple(s for s in self.decodes if s not in seqs),
                                   onboard=tuple(o for o in self.onboard if o.seq not in seqs),
                                   drafts=tuple(d for d in self.drafts if d[0] not in seqs))


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512  # per step, decodes included
    max_prefill_chunk: int = 512  # the largest prefill program
    max_queue_size: int = 256
    queue_timeout_s: float | None = None
    priority_levels: int = 3
    # While some request is decoding, a step computes at most this many prompt tokens (None: no
    # limit but the step budget): a long prompt then arrives in small chunks and the streams keep
    # their pace between tokens, at the cost of that prompt's time to first token.
    prefill_tokens_while_decoding: int | None = None
    # A waiting request whose first chunk does not fit the free pages lets up to this many requests
    # behind it start (ones that fit) before the queue waits for it: small requests are not held up
    # by a large one, and the large one still gets the next pages (0: strict queue order).
    max_bypass: int = 16

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "max_queue_size",
                     "priority_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (each decode takes one)")
        if self.queue_timeout_s is not None and self.queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be positive or null, got {self.queue_timeout_s}")
        if self.max_bypass < 0:
            raise ValueError(f"max_bypass must be >= 0, got {self.max_bypass}")
        if self.prefill_tokens_while_decoding is not None and self.prefill_tokens_while_decoding < 1:
            raise ValueError(f"prefill_tokens_while_decoding must be >= 1 or null, "
                             f"got {self.prefill_tokens_while_decoding}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager):
        self.config = config
        self.kv = kv
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
        self.kv.free(seq)
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
        drafts: list[tuple[Sequence, tuple[int, ...]]] = []
        budget = self.config.max_num_batched_tokens
        prompt_budget = budget  # prompt tokens this step
        limit = self.config.prefill_tokens_while_decoding
        if limit is not None and any(s.wants_decode for s in self.running if s.status is Status.RUNNING):
            prompt_budget = limit

        # Running requests, most entitled first, so preemption takes from the tail.
        self.running.sort(key=lambda s: s.order)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            if seq.uncomputed == 1 and not seq.wants_decode:
                continue  # every token sampled: it ends when the last is read back
            draft, seq.draft = seq.draft, ()
            if seq.uncomputed == 1:  # a decode, and the drafts that fit the budget
                draft = draft[:max(0, budget - len(self._decodes_left(seq)) - 1)]
            n = 1 if seq.uncomputed == 1 else min(seq.uncomputed, budget - len(self._decodes_left(seq)),
                                                  prompt_budget, self.config.max_prefill_chunk)
            if n <= 0:
                continue
            if draft and not self.kv.allocate(seq, seq.num_computed + n + len(draft)):
                draft = ()  # drafts never preempt anyone: without free pages for them, a plain decode
            if not self._make_room(seq, seq.num_computed + n, preempted, now):
                continue  # seq itself was preempted
            if n == 1 and seq.uncomputed == 1:
                decodes.append(seq)
                if draft:
                    drafts.append((seq, draft))
                    budget -= len(draft)
            else:
                prefills.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
                prompt_budget -= n
            budget -= n

        # Admit waiting requests in order while there is budget, a free slot, and pages (no
        # preemption for newcomers: that would only trade one request's progress for another's);
        # past one that does not fit, as long as it may still be bypassed.
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            if i > 0 and self.waiting[0].bypassed >= self.config.max_bypass:
                break  # the head has been passed enough: the queue waits for it
            seq = self.waiting[i]
            if seq in preempted:
                break  # just preempted for lack of pages: not back in this step
            if self.kv.prefix_caching and seq.reuse_prefix and seq.num_computed == 0 and not seq.pages:
                found, cost = self.kv.reuse_prefix(seq, budget)
                seq.num_computed = seq.num_cached = found
                budget -= cost
                if budget <= 0:
                    break
            n = 1 if seq.uncomputed == 1 else min(seq.uncomputed, budget, prompt_budget, self.config.max_prefill_chunk)
            if n <= 0:
                break  # no prompt tokens left this step
            if not self.kv.allocate(seq, seq.num_computed + n):
                if seq.num_cached:  # give the prefix back; it is looked up again next time
                    self.kv.free(seq)
                    seq.num_computed = seq.num_cached = 0
                i += 1
                continue
            self.waiting.pop(i)
            if i > 0:
                self.waiting[0].bypassed += 1
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
        drafts = [(seq, draft) for seq, draft in drafts if seq.status is Status.RUNNING]  # not preempted since
        return StepPlan(tuple(prefills), tuple(decodes), tuple(preempted), tuple(expired), self.kv.take_onboard(),
                        tuple(drafts))

    def commit(self, plan: StepPlan, accepted: dict[Sequence, int] | None = None) -> None:
        """The plan's programs ran: its requests advance, and the pages they filled (or copied in
        from a lower tier) become findable. Requests that left the plan before it ran (finished
        with an error) are skipped. `accepted`: how many drafts each verifying request kept (its
        tokens were read back first); the pages of the rest go back."""
        for chunk in plan.prefills:
            if chunk.seq.status is Status.RUNNING:
                chunk.seq.num_computed = chunk.end
                self.kv.register(chunk.seq, chunk.end)
        for seq in plan.decodes:
            if seq.status is Status.RUNNING:
                seq.num_computed += 1
                self.kv.register(seq, seq.num_computed)
        for seq, _ in plan.drafts:
            if seq.status is Status.RUNNING:
                seq.num_computed += accepted[seq]
                self.kv.register(seq, seq.num_computed)
                self.kv.truncate(seq, seq.num_computed + 1)

    # ---- a step's results --------------------------------------------------------------------

    def sampling(self, seq: Sequence) -> None:
        """A step that samples `seq`'s next token was dispatched: the token counts from now (the
        next step may decode it on the device before the host has it)."""
        seq.num_sampling += 1

    def accept(self, seq: Sequence, token: int) -> None:
        """`seq`'s oldest token still on the device was read back: it joins its tokens."""
        if seq.num_sampling < 1:
            raise ValueError(f"request {seq.request_id} has no sampled token on the device")
        seq.tokens.append(token)
        seq.num_sampling -= 1

    def recompute_from(self, plan: StepPlan, seqs: dict[Sequence, int]) -> StepPlan:
        """Pages `seqs[seq]`… of each of `seqs` could not be copied in from the lower tier: the
        request leaves this step and computes them from there (its pages stay allocated)."""
        for seq, index in seqs.items():
            self.kv.onboard_failed(seq, index)
            seq.num_computed = seq.num_cached = min(seq.num_computed, index * self.kv.page_size)
        return plan.without(set(seqs))

    def _decodes_left(self, seq: Sequence) -> list[Sequence]:
        """Running requests after `seq` that will want one decode token each this step: a prompt
        chunk must leave them their token."""
        i = self.running.index(seq)
        return [s for s in self.running[i + 1:] if s.status is Status.RUNNING and s.wants_decode]

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence], now: float) -> bool:
        """Grow seq's pages to num_tokens, preempting from the tail of `running` as needed.
        False if seq itself had to be preempted."""
        while not self.kv.allocate(seq, num_tokens):
            # the least entitled request holding pages of seq's data replica (seq itself at worst)
            replica = self.kv.replica_of(seq)
            victim = next(s for s in reversed(self.running)
                          if s is seq or replica is None or self.kv.replica_of(s) == replica)
            self._preempt(victim, now)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, now: float) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = seq.num_cached = 0  # recompute prompt + output so far
        seq.draft = ()
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
        return {"waiting": len(self.waiting), "running": len(self.running), **self.kv.describe()}
