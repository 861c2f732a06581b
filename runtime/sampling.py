"""Token sampling on device, and the per-request parameters it reads.

Every per-request value is a row of an array (`SamplingBatch`), so a new temperature, top-p or seed
never recompiles. Randomness comes from (seed, step) alone — step being how many tokens the request
has generated — so the same seed gives the same tokens whatever else shares the batch, and no PRNG
key is ever stored. Order of operations (as vLLM): penalties → greedy or
temperature → top-k → top-p → min-p → draw. Costly filters run only when some row asks for them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from meshserve.models.errors import RequestError
from meshserve.runtime.grammar import Guided

MAX_LOGPROBS = 20  # top-N logprobs a request may ask for; fixed so it never recompiles
BIAS_SLOTS = 128  # per row: logit-bias entries plus tokens held back by min_tokens; fixed likewise
F32_MAX = float(np.finfo(np.float32).max)  # sampling values are float32 on the device


def f32_number(value) -> float | None:
    """`value` as a float if it is a number (not a bool) that float32 holds finite, else None: the one
    check every transport's numbers go through (an int beyond float range, 1e308, NaN: None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if abs(number) <= F32_MAX else None  # False for NaN too


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation. Defaults: greedy, 256 tokens."""

    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt and output; 1 = off
    presence_penalty: float = 0.0  # OpenAI style, over output; 0 = off
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per token (0: only the chosen token's)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (scoring)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI style
    min_tokens: int = 0  # EOS and stop token ids cannot be sampled before this many tokens
    detokenize: bool = True  # False: token ids only, no text (a caller that detokenizes itself)
    guided: Guided | None = None  # what the output must match (runtime/grammar.py)
    # speculative decoding: at most this many drafts a step (0: none); None: the server's setting
    num_speculative_tokens: int | None = None

    def validate(self, vocab_size: int) -> None:
        """Raise RequestError naming the first bad field."""
        for name in ("max_tokens", "top_k", "min_tokens"):
            if not _integer(getattr(self, name)):
                raise RequestError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if f32_number(value) is None:
                raise RequestError(f"{name} must be a finite number within float32's range, got {value!r}")
        if self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for tid, bias in self.logit_bias:
            if not _integer(tid) or not 0 <= tid < vocab_size:
                raise RequestError(f"logit_bias: token {tid} is outside the vocabulary (size {vocab_size})")
            if f32_number(bias) is None or not -100 <= bias <= 100:
                raise RequestError(f"logit_bias: the bias of token {tid} must be in [-100, 100], got {bias!r}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_k < 2**31:
            raise RequestError(f"top_k must be in [0, 2**31), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < 2**31):
            raise RequestError(f"seed must be in [0, 2**31), got {self.seed}")
        k = self.num_speculative_tokens
        if k is not None and (not _integer(k) or k < 0):
            raise RequestError(f"num_speculative_tokens must be a non-negative integer, got {k!r}")
        for tid in self.stop_token_ids:
            if not _integer(tid) or not 0 <= tid < vocab_size:
                raise RequestError(f"stop_token_ids: {tid} is outside the vocabulary (size {vocab_size})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        if not isinstance(self.detokenize, bool):
            raise RequestError(f"detokenize must be true or false, got {self.detokenize!r}")
        if self.stop and not self.detokenize:
            raise RequestError("stop strings need detokenize: they are matched in the text")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _integer(value) or not 0 <= value <= MAX_LOGPROBS):
                raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        if self.guided is not None:
            if not isinstance(self.guided, Guided):
                raise RequestError(f"guided must be a Guided constraint, got {type(self.guided).__name__}")
            self.guided.check()
            if self.min_tokens:
                raise RequestError("min_tokens cannot be combined with a structured-output constraint: the "
                                   "grammar decides where the output ends")

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """SamplingParams of a batch, one row per request (f32 or i32[B])."""

    temperature: Array
    top_k: Array
    top_p: Array
    min_p: Array
    repetition_penalty: Array
    presence_penalty: Array
    frequency_penalty: Array
    seed: Array
    step: Array  # tokens generated so far by the request
    want_logprobs: Array  # bool: compute top-N logprobs at all
    bias_ids: Array  # i32[B, BIAS_SLOTS]: tokens whose logits move (-1: unused slot) …
    bias_values: Array  # f32[B, BIAS_SLOTS]: … by this much (-inf: cannot be sampled)

    # Packed form, what crosses to the device: per row, ints i32[INTS] = (top_k, seed, step,
    # want_logprobs, bias ids…) and floats f32[FLOATS] = (temperature, top_p, min_p, repetition,
    # presence and frequency penalties, bias values…); two arrays per call instead of twelve.
    INTS = 4 + BIAS_SLOTS
    FLOATS = 6 + BIAS_SLOTS
    _INT_PAD = np.array([0, 0, 0, 0] + [-1] * BIAS_SLOTS, np.int32)  # a padding row: greedy, nothing else
    _FLOAT_PAD = np.array([0, 1, 0, 1, 0, 0] + [0] * BIAS_SLOTS, np.float32)

    @classmethod
    def pack(cls, rows: list[tuple[SamplingParams, int, int, tuple[int, ...]] | None], size: int,
             ints: np.ndarray | None = None, floats: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Host arrays from (params, seed, step, held back) per request — held back: token ids that
        cannot be sampled this step (min_tokens); padding rows (None, or past the list) are greedy.
        `ints` / `floats`: [size, ≥ INTS / FLOATS] arrays to write into, from column 0 (else new)."""
        if ints is None:
            ints = np.empty((size, cls.INTS), np.int32)
        if floats is None:
            floats = np.empty((size, cls.FLOATS), np.float32)
        ints[:, :cls.INTS] = cls._INT_PAD
        floats[:, :cls.FLOATS] = cls._FLOAT_PAD
        live = [(r, row) for r, row in enumerate(rows) if row is not None]
        if not live:
            return ints, floats
        at = [r for r, _ in live]  # one assignment per array, not one per row
        ints[at, :4] = [(p.top_k, seed, step, p.logprobs is not None) for _, (p, seed, step, _) in live]
        floats[at, :6] = [(p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                           p.frequency_penalty) for _, (p, _, _, _) in live]
        for r, (p, _, _, held) in live:
            if p.logit_bias or held:
                entries = list(p.logit_bias) + [(tid, -np.inf) for tid in held]
                ints[r, 4:4 + len(entries)] = [tid for tid, _ in entries]
                floats[r, 6:6 + len(entries)] = [bias for _, bias in entries]
        return ints, floats

    @classmethod
    def unpack(cls, ints, floats) -> "SamplingBatch":
        """The batch from its packed columns (on the device: slices, no copies)."""
        return cls(floats[:, 0], ints[:, 0], floats[:, 1], floats[:, 2], floats[:, 3], floats[:, 4], floats[:, 5],
                   ints[:, 1], ints[:, 2], ints[:, 3] != 0, ints[:, 4:cls.INTS], floats[:, 6:cls.FLOATS])

    @classmethod
    def build(cls, rows: list[tuple[SamplingParams, int, int, tuple[int, ...]] | None], size: int) -> "SamplingBatch":
        """`pack` then `unpack`, as host arrays."""
        return cls.unpack(*cls.pack(rows, size))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampled:
    tokens: Int[Array, "b"]
    logprob: Float[Array, "b"]  # of the chosen token, under the model's own distribution
    top_ids: Int[Array, "b n"]  # top-N alternatives (rows that asked for logprobs)
    top_logprobs: Float[Array, "b n"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scored:
    """Prompt scoring of a prefill chunk: at position p, the logprob of the token at p + 1 (the
    `targets`) under the model, and the top-N alternatives. Zeros unless some row asked."""

    logprob: Float[Array, "b t"]
    top_ids: Int[Array, "b t n"]
    top_logprobs: Float[Array, "b t n"]


def score(logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Scored:
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    n = min(MAX_LOGPROBS, logprobs.shape[-1])
    values, ids = jax.lax.top_k(logprobs, n)
    pad = ((0, 0), (0, 0), (0, MAX_LOGPROBS - n))
    return Scored(jnp.where(targets >= 0, chosen, 0.0), jnp.pad(ids, pad).astype(jnp.int32),
                  jnp.pad(values, pad, constant_values=-jnp.inf))


def no_scores(batch: int, tokens: int) -> Scored:
    return Scored(jnp.zeros((batch, tokens), jnp.float32), jnp.zeros((batch, tokens, MAX_LOGPROBS), jnp.int32),
                  jnp.full((batch, tokens, MAX_LOGPROBS), -jnp.inf, jnp.float32))


def apply_penalties(logits: Float[Array, "b v"], s: SamplingBatch, history: Int[Array, "b l"],
                    prompt_len: Int[Array, "b"]) -> Float[Array, "b v"]:
    """history: each row's tokens so far (prompt then output), -1 padded; prompt_len splits it."""
    B, V = logits.shape
    valid = history >= 0
    is_output = (jnp.arange(history.shape[1])[None] >= prompt_len[:, None]) & valid
    ids = jnp.where(valid, history, 0)
    rows = jnp.arange(B)[:, None]
    seen = jnp.zeros((B, V), bool).at[rows, ids].max(valid)
    counts = jnp.zeros((B, V), jnp.float32).at[rows, ids].add(is_output.astype(jnp.float32))
    rp = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - s.presence_penalty[:, None] * (counts > 0) - s.frequency_penalty[:, None] * counts


def allowed(mask: Int[Array, "b w"], vocab: int) -> Array:
    """bool[b, vocab] from a bitmask (token t: bit t % 32 of word t // 32; runtime/grammar.py)."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab] != 0


def sample(logits: Float[Array, "b v"], s: SamplingBatch, history: Int[Array, "b l"] | None = None,
           prompt_len: Int[Array, "b"] | None = None, mask: Int[Array, "b w"] | None = None) -> Sampled:
    """`mask`: the tokens each row may sample (structured outputs; all bits set: any)."""
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # the model's own: before biases, penalties and masks
    if mask is not None:
        logits = jnp.where(allowed(mask, logits.shape[-1]), logits, -jnp.inf)
    logits = jax.lax.cond(jnp.any(s.bias_ids >= 0), lambda x: _add_bias(x, s), lambda x: x, logits)
    if history is not None:
        penalized = (s.repetition_penalty != 1) | (s.presence_penalty != 0) | (s.frequency_penalty != 0)
        logits = jax.lax.cond(jnp.any(penalized),
                              lambda x: apply_penalties(x, s, history, prompt_len), lambda x: x, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    random = s.temperature > 0

    def draw(x):
        x = _tempered(x, s, random)
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seed, s.step)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(random), draw, lambda x: greedy, logits)
    tokens = jnp.where(random, drawn, greedy)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = _top_logprobs(logprobs, s.want_logprobs)
    return Sampled(tokens, chosen, top_ids, top_lp)


def _tempered(x: Float[Array, "b v"], s: SamplingBatch, random: Array) -> Float[Array, "b v"]:
    """Logits of the random rows divided by their temperature, then top-k, top-p and min-p."""
    x = x / jnp.where(random, s.temperature, 1.0)[:, None]
    filtered = (s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0)
    return jax.lax.cond(jnp.any(filtered & random), lambda y: _filter(y, s), lambda y: y, x)


def _top_logprobs(logprobs: Float[Array, "b v"], want: Array) -> tuple[Array, Array]:
    """The top-N (MAX_LOGPROBS) logprobs and their ids of each row, when any row wants them."""
    n = min(MAX_LOGPROBS, logprobs.shape[-1])  # a vocabulary may be smaller than N (tests)

    def top(x):
        values, ids = jax.lax.top_k(x, n)
        pad = ((0, 0), (0, MAX_LOGPROBS - n))
        return jnp.pad(values, pad, constant_values=-jnp.inf), jnp.pad(ids, pad).astype(jnp.int32)

    def none(x):
        return (jnp.full((x.shape[0], MAX_LOGPROBS), -jnp.inf, x.dtype),
                jnp.zeros((x.shape[0], MAX_LOGPROBS), jnp.int32))

    return jax.lax.cond(jnp.any(want), top, none, logprobs)


def verify_drafts(logits: Float[Array, "b t v"], drafts: Int[Array, "b k"], counts: Int[Array, "b"],
                  s: SamplingBatch) -> tuple[Sampled, Int[Array, "b"]]:
    """Speculative decoding's rejection sampler. Row b fed its last token and `counts[b]` drafted
    tokens (drafts[b, :counts[b]], t = k + 1 positions); logits[b, j] is the distribution of the token
    after position j, so draft j is checked against logits[b, j]. Returns, per row, the tokens
    [b, t]: its accepted drafts, then at position `accepted[b]` one token of its own (the correction
    where a draft was rejected, the bonus token where all were accepted) — accepted[b] + 1 tokens —
    with their logprobs like `sample`'s.

    Greedy rows accept a draft while it is the argmax. Random rows use rejection sampling with the
    draft as a point mass (n-gram and greedy draft models propose that way): accept draft d with
    probability p(d) under the row's processed distribution p (temperature, top-k/p, min-p, bias),
    else draw from p with d removed. The output is distributed exactly as p, step after step.
    Position j draws from (seed, step + j), as `sample` would for that token. Rows under penalties,
    min_tokens or a grammar do not speculate (the engine keeps them to plain decoding)."""
    B, T, V = logits.shape
    rows = jax.tree.map(lambda a: jnp.repeat(a, T, axis=0), s)
    j = jnp.tile(jnp.arange(T, dtype=jnp.int32), B)
    rows = dataclasses.replace(rows, step=rows.step + j)
    x = logits.reshape(B * T, V).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(x, axis=-1)
    x = jax.lax.cond(jnp.any(rows.bias_ids >= 0), lambda y: _add_bias(y, rows), lambda y: y, x)
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    draft = jnp.concatenate([drafts, jnp.full((B, 1), -1, jnp.int32)], axis=1).reshape(B * T)
    proposed = (j < jnp.repeat(counts, T)) & (draft >= 0)
    random = rows.temperature > 0

    def draw(y):
        y = _tempered(y, rows, random)
        keys = jax.vmap(lambda seed, step: jax.random.split(jax.random.fold_in(jax.random.key(seed), step)))(
            rows.seed, rows.step)
        p_draft = jnp.take_along_axis(jax.nn.softmax(y, axis=-1), jnp.maximum(draft, 0)[:, None], axis=-1)[:, 0]
        u = jax.vmap(jax.random.uniform)(keys[:, 0])
        residual = jnp.where(proposed[:, None] & (jnp.arange(V)[None] == draft[:, None]), -jnp.inf, y)
        return u < p_draft, jax.vmap(jax.random.categorical)(keys[:, 1], residual).astype(jnp.int32)

    accept_random, drawn = jax.lax.cond(jnp.any(random), draw,
                                        lambda y: (jnp.zeros(B * T, bool), greedy), x)
    accept = proposed & jnp.where(random, accept_random, greedy == draft)
    accepted = jnp.sum(jnp.cumprod(accept.reshape(B, T), axis=1), axis=1).astype(jnp.int32)
    own = jnp.where(random, drawn, greedy).reshape(B, T)
    tokens = jnp.where(jnp.arange(T)[None] < accepted[:, None], draft.reshape(B, T), own)
    chosen = jnp.take_along_axis(logprobs, tokens.reshape(B * T, 1), axis=-1)[:, 0]
    top_lp, top_ids = _top_logprobs(logprobs, rows.want_logprobs)
    return Sampled(tokens, chosen.reshape(B, T), top_ids.reshape(B, T, -1), top_lp.reshape(B, T, -1)), accepted


def _add_bias(logits: Float[Array, "b v"], s: SamplingBatch) -> Float[Array, "b v"]:
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, jnp.maximum(s.bias_ids, 0)].add(jnp.where(s.bias_ids >= 0, s.bias_values, 0.0))


def _filter(x: Float[Array, "b v"], s: SamplingBatch) -> Float[Array, "b v"]:
    """top-k, then top-p (the smallest set of best tokens whose mass reaches p), then min-p."""
    V = x.shape[-1]
    ordered = jnp.sort(x, axis=-1)[:, ::-1]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    x = jnp.where(x >= kth, x, -jnp.inf)
    ordered = jnp.where(jnp.arange(V)[None] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    kept = before < s.top_p[:, None]
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= threshold, x, -jnp.inf)
    # min-p: drop tokens less likely than min_p times the best one
    floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(jnp.maximum(s.min_p, 1e-30))[:, None]
    return jnp.where((s.min_p[:, None] > 0) & (x < floor), -jnp.inf, x)
