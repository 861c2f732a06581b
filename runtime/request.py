"""One request: what it may ask of the engine (`check_request`, applied once, at the boundary) and the
checked form the engine takes and trusts (`Request`). A request that passes the checks can always
run to completion. Its state inside the engine is a `Sequence` (runtime/sequence.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence as Seq

from meshserve.models.errors import ConfigError, RequestError
from meshserve.runtime.sampling import BIAS_SLOTS, SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Bounds on what one request may carry, so none can cost the engine thread more than a
    bounded amount of work per token (the `limits:` part of the engine config)."""

    max_stop_strings: int = 16  # OpenAI allows 4; tool-calling clients send a handful
    max_stop_string_chars: int = 1024
    max_stop_token_ids: int = 256
    max_logit_bias: int = 64  # entries of logit_bias

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"limits.{f.name} must be a positive integer, got {value!r}")
        if self.max_logit_bias > BIAS_SLOTS:
            raise ConfigError(f"limits.max_logit_bias must be <= {BIAS_SLOTS} (the sampler's bias slots), "
                              f"got {self.max_logit_bias}")

    def check(self, params: SamplingParams) -> None:
        if len(params.stop) > self.max_stop_strings:
            raise RequestError(f"stop: {len(params.stop)} stop strings, at most {self.max_stop_strings} allowed")
        longest = max((len(s) for s in params.stop if isinstance(s, str)), default=0)
        if longest > self.max_stop_string_chars:
            raise RequestError(f"stop: a stop string of {longest} characters, at most "
                               f"{self.max_stop_string_chars} allowed")
        if len(params.stop_token_ids) > self.max_stop_token_ids:
            raise RequestError(f"stop_token_ids: {len(params.stop_token_ids)} ids, at most "
                               f"{self.max_stop_token_ids} allowed")
        if len(params.logit_bias) > self.max_logit_bias:
            raise RequestError(f"logit_bias: {len(params.logit_bias)} entries, at most {self.max_logit_bias} allowed")


def check_request(ids: Seq[int], params: SamplingParams, priority: int, *, vocab_size: int,
                  max_seq_len: int, priority_levels: int, limits: RequestLimits = RequestLimits(),
                  eos_ids: int = 0, speculative_tokens: int = 0) -> None:
    """Raise RequestError naming the first problem with a request; needs no compiled engine.

    `max_seq_len` is a context the KV cache is known to hold (the engine checks that at start-up),
    so a request within it never waits for pages that cannot exist. The context holds every token
    the model reads: the prompt and each generated token but the last (sampled, never read back),
    so a prompt of max_seq_len tokens may still be scored (max_tokens 1). `speculative_tokens`: the
    most drafts a step the engine verifies (0: it does not speculate)."""
    if not ids:
        raise RequestError("prompt is empty")
    if len(ids) > max_seq_len:  # before looking at every id: a huge prompt fails at once
        raise RequestError(f"prompt of {len(ids)} tokens does not fit the context of {max_seq_len} tokens")
    bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"prompt token id {bad} is outside the vocabulary (size {vocab_size})")
    limits.check(params)
    params.validate(vocab_size)
    if params.min_tokens and len(params.logit_bias) + len(params.stop_token_ids) + eos_ids > BIAS_SLOTS:
        raise RequestError(f"min_tokens: with {len(params.stop_token_ids)} stop_token_ids and "
                           f"{len(params.logit_bias)} logit_bias entries, more than {BIAS_SLOTS} tokens to hold back")
    if len(ids) + params.max_tokens - 1 > max_seq_len:
        raise RequestError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                           f"exceeds the context of {max_seq_len} tokens by more than the last token")
    if not isinstance(priority, int) or not 0 <= priority < priority_levels:
        raise RequestError(f"priority must be in [0, {priority_levels}), got {priority}")
    k = params.num_speculative_tokens
    if k and not speculative_tokens:
        raise RequestError(f"num_speculative_tokens: this server does not speculate (asked for {k})")
    if k and k > speculative_tokens:
        raise RequestError(f"num_speculative_tokens must be in [0, {speculative_tokens}] (the server's "
                           f"speculative config), got {k}")


@dataclasses.dataclass(frozen=True)
class Request:
    """A request that passed `check_request` against an engine's limits (made by Engine.check, or by
    serving/preprocess.py with the same checks): Engine.add takes it as it is."""

    token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    request_id: str | None = None  # None: the engine names it
    arrival: float | None = None  # the engine's clock when its caller received it (None: when added)
    fork_of: str | None = None  # another sample of that request's prompt (Engine.add)
    queue_timeout_s: float | None = None  # overrides the engine's queue timeout
    grammar: Any = None  # params.guided compiled (runtime/grammar.Grammar), by whoever checked the request
