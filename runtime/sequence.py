"""A request's state inside the engine. Plain Python: no JAX here.

Its progress and tokens are the scheduler's to change (runtime/scheduler.py), its pages and their
names the KV manager's (runtime/kv_manager.py); everything else only reads them."""

from __future__ import annotations

import dataclasses
import enum


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:

    request_id: str
    tokens: list[int]  # prompt, then the generated tokens read back so far
    prompt_len: int
    priority: int = 0  # lower is served first
    arrival: float = 0.0
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_sampling: int = 0  # tokens sampled on the device, not read back yet (they follow `tokens`)
    pages: list[int] = dataclasses.field(default_factory=list)  # its page table
    page_hashes: list[bytes] = dataclasses.field(default_factory=list)  # names of its full pages, in order
    num_registered: int = 0  # its first pages findable in the prefix cache
    started: bool = False  # ran at least once
    queue_timeout_s: float | None = None  # overrides SchedulerConfig.queue_timeout_s
    num_preemptions: int = 0
    scheduled_at: float | None = None  # when first admitted (queue time = scheduled_at - arrival)
    num_cached: int = 0  # prompt tokens whose K/V came from the prefix cache (last admission)
    queued_at: float = 0.0  # when it last entered the waiting queue (arrival, or its preemption)
    reuse_prefix: bool = True  # may start from cached pages (not while its prompt is being scored)
    bypassed: int = 0  # requests behind it in the queue started while it did not fit
    max_total: int | None = None  # prompt + max_tokens: its last token is sampled, never computed
    draft: tuple[int, ...] = ()  # tokens proposed to follow it, for the next plan to verify (speculative)

    @property
    def total(self) -> int:
        """Its tokens, those still on the device included."""
        return len(self.tokens) + self.num_sampling

    @property
    def uncomputed(self) -> int:
        return self.total - self.num_computed

    @property
    def wants_decode(self) -> bool:
        """One token left to compute, and more to sample after it (a request whose every token is
        sampled ends when the last is read back: no step is planned for it)."""
        return self.uncomputed == 1 and (self.max_total is None or self.total < self.max_total)

    @property
    def order(self) -> tuple:
        return (self.priority, self.arrival)
