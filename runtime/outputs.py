"""What the engine gives back, and the one place it is made: a step's sampled tokens and prompt scores
turned into `RequestOutput`s — stop tokens and strings, text, logprobs, prompt logprobs, finish
reasons — and held forks released. The output processor keeps what each request wants of its
output (`Tracked`); the tokens themselves join a request through the scheduler (`accept`), and a
finished request leaves it (`remove`) in the same step, so its pages are free at once.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from meshserve.runtime.sequence import Sequence, Status
from meshserve.runtime.sampling import SamplingParams
from meshserve.runtime.scheduler import Scheduler
from meshserve.runtime.text import NoText, TextStream

log = logging.getLogger("meshserve.engine")


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
class Tracked:
    """What a request wants of its output."""

    seq: Sequence
    params: SamplingParams
    seed: int
    text: TextStream | NoText  # NoText: the request asked for token ids only
    stop_ids: frozenset[int]
    prompt_scores: list[TokenLogprob] | None = None  # scores of prompt tokens 1…, while being computed
    fork_of: str | None = None  # waits for this request's prompt to be computed (see Engine.add)
    matcher: Any = None  # its grammar's (structured outputs), advanced by each token it accepts

    @property
    def scoring(self) -> bool:
        return self.prompt_scores is not None and len(self.prompt_scores) < self.seq.prompt_len - 1


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, eos_ids: frozenset[int], max_seq_len: int):
        self.scheduler = scheduler
        self.eos_ids = eos_ids
        self.max_seq_len = max_seq_len
        self.requests: dict[str, Tracked] = {}

    # ---- requests in and out ----------------------------------------------------------------------

    def add(self, req: Tracked, fork_of: str | None) -> None:
        """Track `req` and queue it (QueueFull propagates, leaving nothing behind); a fork of a
        request whose prompt is still to be computed is held here until it is (`release_forks`)."""
        seq = req.seq
        if req.params.prompt_logprobs is not None:
            req.prompt_scores = []
            seq.reuse_prefix = False  # every prompt position's logits are needed: compute them all
        parent = self.requests.get(fork_of) if fork_of is not None else None
        if parent is not None and parent.fork_of is None:
            req.fork_of = fork_of  # held, not queued, until the prompt's pages are cached
            seq.reuse_prefix = True  # (its prompt scores, if asked, come from the original)
        else:
            self.scheduler.add(seq)
        self.requests[seq.request_id] = req

    def num_queued(self) -> int:
        """Requests waiting: in the scheduler's queue, or held (forks waiting for their prompt)."""
        return len(self.scheduler.waiting) + sum(r.fork_of is not None for r in self.requests.values())

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req.seq)
        return True

    def release_forks(self, now: float) -> None:
        """Queue held forks whose prompt is computed (or whose original left): they find its pages.
        They were admitted with their original, so they go in whatever the queue holds, and wait
        from now; they take its prompt scores, or compute their own if it left before it had them."""
        for req in [r for r in self.requests.values() if r.fork_of is not None]:
            parent = self.requests.get(req.fork_of)
            if parent is None or parent.seq.num_computed >= parent.seq.prompt_len:
                req.fork_of = None
                if req.prompt_scores is not None:
                    if parent is not None and parent.prompt_scores is not None and not parent.scoring:
                        req.prompt_scores = list(parent.prompt_scores)
                    else:
                        req.seq.reuse_prefix = False
                self.scheduler.add(req.seq, now=now, over_limit=True)

    def params_of(self, seq: Sequence) -> SamplingParams:
        return self.requests[seq.request_id].params

    def sampling_of(self, seq: Sequence) -> tuple[SamplingParams, int, bool, tuple[int, ...], Any]:
        """(params, seed, whether its prompt is scored, token ids it may not sample now, its grammar's
        matcher or None): the runner's view."""
        req = self.requests[seq.request_id]
        params, held = req.params, ()
        if seq.total - seq.prompt_len < params.min_tokens:  # nothing may end it yet
            held = tuple(sorted(req.stop_ids | (frozenset() if params.ignore_eos else self.eos_ids)))
        return params, req.seed, req.scoring, held, req.matcher

    def constrained(self, seq: Sequence) -> bool:
        """Whether `seq` samples under a grammar (its next mask needs its last token on the host)."""
        req = self.requests.get(seq.request_id)
        return req is not None and req.matcher is not None

    def _owner(self, seq: Sequence) -> Tracked | None:
        req = self.requests.get(seq.request_id)
        return req if req is not None and req.seq is seq else None  # None: aborted or ended meanwhile

    # ---- a step's results ---------------------------------------------------------------------------

    def expired(self, seqs) -> list[RequestOutput]:
        return [self.finish(self.requests[s.request_id], "rejected", error=f"queue timeout: waited more than "
                            f"{s.queue_timeout_s or self.scheduler.config.queue_timeout_s} s") for s in seqs]

    def failed(self, seq: Sequence, error: Exception) -> RequestOutput | None:
        """A fault in `seq`'s host work: it ends alone, with finish reason "error"."""
        req = self._owner(seq)
        if req is None:
            return None
        log.error("request %s failed: %s: %s", seq.request_id, type(error).__name__, error)
        return self.finish(req, "error", error=f"{type(error).__name__}: {error}")

    def scored(self, seq: Sequence, scored, at: tuple[int, int], start: int, count: int) -> None:
        """File a chunk's prompt scores (positions start… score prompt tokens start + 1…; in Scored
        from index `at` on): the part not filed yet (a recomputation after preemption may cut the
        prompt into other chunks)."""
        req = self._owner(seq)
        if req is None or not req.scoring or not start <= len(req.prompt_scores) < start + count:
            return  # gone, done, or nothing new
        n, (b, o) = req.params.prompt_logprobs, at
        for k in range(len(req.prompt_scores) - start, count):
            top = tuple((int(i), float(v)) for i, v in zip(scored.top_ids[b, o + k, :n],
                                                           scored.top_logprobs[b, o + k, :n]))
            req.prompt_scores.append(TokenLogprob(seq.tokens[start + k + 1], float(scored.logprob[b, o + k]), top))
        if not req.scoring:
            seq.reuse_prefix = True  # a recomputation may take cached pages now

    def sampled(self, seq: Sequence, sampled, token: int, row: int) -> RequestOutput | None:
        """`token` (row `row` of `sampled`) is `seq`'s next: it joins the request, which may end
        here. A fault in this request's results ends this request only."""
        req = self._owner(seq)
        if req is None:
            return None
        try:
            self.scheduler.accept(seq, token)
            return self._next(req, sampled, token, row)
        except Exception as e:
            return self.failed(seq, e)

    def _next(self, req: Tracked, sampled, token: int, row: int) -> RequestOutput:
        seq, params = req.seq, req.params
        generated = len(seq.tokens) - seq.prompt_len
        scores = (None, *req.prompt_scores) if req.prompt_scores is not None and generated == 1 else ()
        logprobs = ()
        if params.logprobs is not None:
            top = tuple((int(i), float(lp)) for i, lp in zip(sampled.top_ids[row, :params.logprobs],
                                                             sampled.top_logprobs[row, :params.logprobs]))
            logprobs = (TokenLogprob(token, float(sampled.logprob[row]), top),)
        if (token in self.eos_ids and not params.ignore_eos) or token in req.stop_ids:
            # the stop token ends the output and is not part of it; its logprob is still reported
            # (last), as OpenAI-style scoring counts one entry per sampled token
            return self.finish(req, "stop", drop_last=True, logprobs=logprobs, prompt_logprobs=scores)
        grammar_done = False
        if req.matcher is not None:
            if not req.matcher.consume_token(token):
                return self.finish(req, "error", error=f"structured output: {req.matcher.get_error()}")
            grammar_done = req.matcher.is_stopped()  # complete, and nothing may follow
        text = req.text.push(token, stops=generated >= params.min_tokens)
        if req.text.stopped_by is not None:
            return self.finish(req, "stop", last=(token,), text=text, logprobs=logprobs, prompt_logprobs=scores)
        if grammar_done:
            return self.finish(req, "stop", last=(token,), text=text, logprobs=logprobs, prompt_logprobs=scores)
        if generated >= params.max_tokens or len(seq.tokens) > self.max_seq_len:
            return self.finish(req, "length", last=(token,), text=text, logprobs=logprobs, prompt_logprobs=scores)
        return RequestOutput(seq.request_id, (token,), text, logprobs=logprobs, prompt_tokens=seq.prompt_len,
                             completion_tokens=generated, queue_time_s=_queue_time(seq),
                             cached_tokens=min(seq.num_cached, seq.prompt_len), prompt_logprobs=scores)

    def finish(self, req: Tracked, reason: str, *, last: tuple[int, ...] = (), text: str = "", logprobs=(),
               error: str | None = None, drop_last: bool = False, prompt_logprobs=()) -> RequestOutput:
        """End `req` (its pages back to the pool in this same step). `drop_last`: its last token (an
        EOS or stop token) ended it and is not part of the output."""
        seq = req.seq
        self.requests.pop(seq.request_id, None)
        self.scheduler.remove(seq)
        tail = req.text.finish() if reason not in ("rejected", "error") else ""
        return RequestOutput(seq.request_id, last, text + tail, finished=True, finish_reason=reason, error=error,
                             logprobs=logprobs, prompt_tokens=seq.prompt_len,
                             completion_tokens=len(seq.tokens) - seq.prompt_len - drop_last,
                             queue_time_s=_queue_time(seq), cached_tokens=min(seq.num_cached, seq.prompt_len),
                             prompt_logprobs=prompt_logprobs)

    def awaited(self, seqs) -> bool:
        """Whether any of `seqs` still has a result someone waits for."""
        return any(seq.status is not Status.FINISHED for seq in seqs)


def _queue_time(seq: Sequence) -> float | None:
    return None if seq.scheduled_at is None else seq.scheduled_at - seq.arrival
