"""Speculative decoding: a request's next tokens guessed on the host, checked in one step.

    tokens so far ──propose──▶ drafts d1…dk ──verify program──▶ accepted d1…da + one token of its own

Decoding is memory-bound: a step streams every weight for one token per request. A verify step
(runtime/programs.py) feeds a request's last token and k drafts at once and keeps the drafts the
rejection sampler accepts (runtime/sampling.verify_drafts), then one token of its own: 1 … k + 1
tokens for about the weight traffic of one. Greedy output is the same token for token as without
speculation; sampled output has the same distribution.

Proposers (`method`):
  ngram        prompt lookup (vLLM's `ngram`): the longest suffix of the request's tokens
               (prompt_lookup_max down to prompt_lookup_min tokens) that occurred before, latest
               occurrence first, proposes the tokens that followed it. A numpy scan on the host; it
               pays off where outputs repeat their input (editing, extraction, code, "repeat exactly").
  draft_model  a smaller checkpoint with the target's tokenizer (`model`), run by an engine of its
               own (its KV pages, its compiled programs, its prefix cache: each round prefills only
               the tokens since its last full page, then decodes k − 1 steps), greedily, for every
               speculating request at once. Sized from memory, its pool comes out of the target's KV
               budget. One device.
Both propose a point mass (one token per position), which the rejection sampler accepts or
corrects exactly (runtime/sampling.verify_drafts).

When speculation runs (the engine's `_speculating`, `Speculator.wants`): only while at most `disable_by_batch_size`
requests run (a large batch is compute-bound: verifying drafts then costs more than it saves), and
per request only when sampling is plain (no penalties, no min_tokens still holding, no grammar: their
masks and histories change token by token). Each request adapts its draft length as Hugging Face's
assisted generation does (+2 after a step that accepted every draft, −1 otherwise); after a step
that proposed nothing or had nothing accepted it skips the next 1, 2, 4, 8 steps (plain decoding,
with async scheduling) before it tries again.

Page accounting: the scheduler allocates pages for the drafted positions when they are free (drafts
never preempt anyone; without them the request decodes plainly); once the step is read back the
request keeps what its accepted tokens need and gives the rest back (KVManager.truncate).
Only accepted tokens are ever hashed into the prefix cache.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from meshserve.models.errors import ConfigError
from meshserve.runtime.sequence import Status

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 15  # a verify program feeds at most 16 tokens per request
MAX_SKIP = 8  # steps a request decodes plainly after a miss, at most


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """The `speculative:` section of the engine config (vLLM's `speculative_config` names)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # drafts per step, at most (the verify programs' width − 1)
    prompt_lookup_max: int = 4  # the longest suffix n-gram looked up
    prompt_lookup_min: int = 2  # the shortest
    disable_by_batch_size: int = 4  # no speculation while more requests than this run
    model: str | None = None  # draft_model: the draft checkpoint's folder

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"speculative.method must be one of {', '.join(METHODS)}, got {self.method!r} "
                              f"(EAGLE-3 heads are not built)")
        if (self.method == "draft_model") != (self.model is not None):
            raise ConfigError("speculative.model (the draft checkpoint) goes with method draft_model, and only "
                              f"with it (method {self.method!r}, model {self.model!r})")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"speculative.{name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"speculative.num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                              f"got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"speculative.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                              f"prompt_lookup_max ({self.prompt_lookup_max})")


def ngram_propose(tokens: np.ndarray, k: int, lo: int, hi: int) -> tuple[int, ...]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    of hi … lo tokens; () when none occurred."""
    n_tokens = len(tokens)
    for n in range(min(hi, n_tokens - 1), lo - 1, -1):
        suffix = tokens[n_tokens - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:n_tokens - 1], n)  # starts 0 … len − n − 1
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tuple(int(t) for t in tokens[start:start + k])
    return ()


@dataclasses.dataclass
class _State:
    k: int  # drafts to propose next
    most: int  # what the k adapts within: the request's num_speculative_tokens, else the server's
    misses: int = 0  # steps in a row that proposed nothing or had nothing accepted
    skip: int = 0  # plain decode steps left before the next proposal


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map every token to the same id (and have the same special tokens)."""
    return a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(with_added_tokens=True)


class DraftModel:
    """A draft checkpoint's engine, proposing greedily for many requests at once."""

    def __init__(self, engine):
        self.engine = engine

    def propose(self, items: list[tuple[list[int], int]]) -> list[tuple[int, ...]]:
        """For each (tokens so far, k): up to k tokens the draft model would write next (greedy)."""
        from meshserve.runtime.sampling import SamplingParams

        engine, ids = self.engine, {}
        for i, (tokens, k) in enumerate(items):
            if k > 0:
                ids[engine.add_request(list(tokens), SamplingParams(max_tokens=k, ignore_eos=True,
                                                                    detokenize=False))] = i
        drafts: list[list[int]] = [[] for _ in items]
        while engine.has_unfinished:
            for out in engine.step():
                if out.error is not None:
                    raise RuntimeError(f"the draft model failed: {out.error}")
                drafts[ids[out.request_id]] += out.token_ids
        return [tuple(d) for d in drafts]


class Speculator:
    """Proposes drafts for the engine and keeps each request's adaptation and the counters."""

    def __init__(self, config: SpeculativeConfig, draft: DraftModel | None = None):
        self.config = config
        self.draft = draft
        self._state: dict = {}  # Sequence → _State
        k = config.num_speculative_tokens
        self.num_drafts = 0  # verify rows run
        self.num_draft_tokens = 0  # tokens proposed in them
        self.num_accepted_tokens = 0  # drafts accepted
        self.accepted_per_position = np.zeros(k, np.int64)  # drafts accepted at position 0 … k − 1

    def state(self, seq, most: int | None = None) -> _State:
        """`seq`'s adaptation, made at its first proposal with at most `most` drafts a step (None:
        the server's num_speculative_tokens)."""
        state = self._state.get(seq)
        if state is None:
            k = min(most or self.config.num_speculative_tokens, self.config.num_speculative_tokens)
            state = self._state[seq] = _State(k, k)
        return state

    def forget_finished(self) -> None:
        """Drop the state of requests that left."""
        for seq in [s for s in self._state if s.status is Status.FINISHED]:
            del self._state[seq]

    def wants(self, seq, most: int | None = None) -> bool:
        """Whether `seq` proposes this step (it is not skipping after a miss); counts a skipped step.
        `most`: the request's num_speculative_tokens (None: the server's)."""
        state = self.state(seq, most)
        if state.skip:
            state.skip -= 1
            return False
        return True

    def propose(self, seq, room: int) -> tuple[int, ...]:
        """Drafts for `seq` (its tokens all on the host), at most `room` (what max_tokens and the
        context leave); () counts as a miss."""
        state = self.state(seq)
        c = self.config
        draft = ngram_propose(np.asarray(seq.tokens, np.int32), min(state.k, room), c.prompt_lookup_min,
                              c.prompt_lookup_max) if room > 0 else ()
        if not draft:
            self._miss(state)
        return draft

    def propose_all(self, items: list[tuple]) -> list[tuple[int, ...]]:
        """`propose` for each (seq, room); a draft model's for all of them in one batch."""
        if self.draft is None:
            return [self.propose(seq, room) for seq, room in items]
        drafts = self.draft.propose([(seq.tokens, min(self.state(seq).k, room)) for seq, room in items])
        for (seq, _), draft in zip(items, drafts):
            if not draft:
                self._miss(self.state(seq))
        return drafts

    def record(self, seq, proposed: int, accepted: int) -> None:
        """A verify row of `proposed` drafts accepted `accepted` of them."""
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        self.accepted_per_position[:accepted] += 1
        state = self.state(seq)
        if accepted == proposed:
            state.k = min(state.most, state.k + 2)
        else:
            state.k = max(1, state.k - 1)
        if accepted:
            state.misses = 0
        else:
            self._miss(state)

    @staticmethod
    def _miss(state: _State) -> None:
        state.misses += 1
        state.skip = min(2 ** (state.misses - 1), MAX_SKIP)

    def stats(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_position": self.accepted_per_position.tolist()}
