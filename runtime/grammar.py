"""Structured outputs: what a request's output must match — a JSON schema, any JSON object, a regex, a
choice of strings, a Lark grammar — compiled by llguidance against the model's tokenizer into a
matcher that says, before every token, which tokens may come next (a bitmask), and follows the
tokens the request accepts.

    compiler = GrammarCompiler(tokenizer, vocab_size)           # the engine's (engine.grammars)
    grammar = compiler.compile(Guided("json", schema_text))     # RequestError naming what is wrong
    matcher = grammar.matcher()                                 # one per request: a copy, cheap
    fill_masks(compiler, [(matcher, row), …], mask)             # i32[rows, ceil(vocab / 32)]
    matcher.consume_token(token)

Compiling is the costly part and runs where the request is checked (a frontend's preprocessing
threads; llguidance releases the GIL meanwhile), never on the engine thread: a grammar is compiled
once per (kind, text) and kept (a bounded LRU), and each request copies it. A compile is bounded
twice: llguidance's own limits (grammar size, lexer fuel) and a wall-clock limit (`timeout_s`)
after which the request is refused and the grammar remembered as refused.

Masks are bits, token t allowed when bit t % 32 of word t // 32 is set; the programs turn them into
-inf before sampling (runtime/sampling.py). Rows without a grammar pass all bits set. Tokens past
the tokenizer's vocabulary (a padded embedding) are never allowed in a constrained row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import re
import threading
import time
from typing import Any, Sequence

import numpy as np

from meshserve.models.errors import RequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON as a model writes it: no whitespace between tokens beyond a few characters (an unbounded run
# of whitespace is how a constrained model goes on forever), separators as json.dumps writes them
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,8}", "item_separator": ", ", "key_separator": ": ",
                "whitespace_flexible": False}
MAX_SPEC_CHARS = 1 << 20  # a constraint's text; the HTTP body limit is the other bound
_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}


class ConstraintError(RequestError):
    """A constraint that cannot be compiled (a frontend names the field that carried it)."""


@dataclasses.dataclass(frozen=True)
class Guided:
    """A request's constraint on its output: `kind` one of KINDS; `spec` the JSON schema as JSON
    text (json), the regex (regex), the choices as a JSON list of strings (choice), the Lark
    grammar (grammar), or "" (json_object: any JSON object)."""

    kind: str
    spec: str = ""

    def check(self) -> None:
        if self.kind not in KINDS:
            raise RequestError(f"guided decoding: the kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise RequestError(f"guided decoding: the {self.kind} must be given as text")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise RequestError(f"guided decoding: a {_NAMES[self.kind]} of {len(self.spec)} characters, at most "
                               f"{MAX_SPEC_CHARS} allowed")
        if self.kind != "json_object" and not self.spec:
            raise RequestError(f"guided decoding: the {_NAMES[self.kind]} is empty")

    @classmethod
    def json_schema(cls, schema: Any) -> "Guided":
        """A schema given as a JSON value (not re-ordered: properties come out in the schema's order)."""
        if not isinstance(schema, (dict, bool)):
            raise RequestError("a JSON schema must be an object")
        return cls("json", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))

    @classmethod
    def choice(cls, choices: Any) -> "Guided":
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) and c for c in choices)):
            raise RequestError("guided_choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices, ensure_ascii=False))


def _grammar_text(guided: Guided) -> str:
    """The llguidance grammar of a constraint (RequestError for a spec that is not even well formed)."""
    import llguidance

    g = llguidance.LLMatcher
    if guided.kind == "json_object":
        return g.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if guided.kind == "json":
        try:
            schema = json.loads(guided.spec)
        except ValueError as e:
            raise RequestError(f"the JSON schema is not JSON: {e}") from None
        if isinstance(schema, dict) and "x-guidance" in schema:
            raise RequestError("the JSON schema's x-guidance options are the server's to set (at /x-guidance)")
        try:
            return g.grammar_from_json_schema(schema if isinstance(schema, dict) else guided.spec,
                                              overrides=JSON_OPTIONS)
        except ValueError as e:
            raise RequestError(f"the JSON schema is not valid: {e}") from None
    if guided.kind == "regex":
        return g.grammar_from_regex(guided.spec)
    if guided.kind == "choice":
        choices = json.loads(guided.spec)
        return g.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    return g.grammar_from_lark(guided.spec)


def _pointer(schema: Any, key: str, at: str = "") -> str | None:
    """The JSON pointer of the first place `key` is a keyword of `schema` (depth first), else None."""
    if isinstance(schema, dict):
        if key in schema:
            return f"{at}/{_escape(key)}"
        for k, v in schema.items():
            if k in ("enum", "const", "default", "examples"):  # values, not schemas
                continue
            found = _pointer(v, key, f"{at}/{_escape(k)}")
            if found:
                return found
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            found = _pointer(v, key, f"{at}/{i}")
            if found:
                return found
    return None


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _explain(guided: Guided, error: str) -> str:
    """llguidance's error, with the JSON pointer of each schema keyword it cannot honour."""
    error = error.strip().splitlines()[0] if error.strip() else "unknown error"
    if guided.kind != "json":
        return f"the {_NAMES[guided.kind]} does not compile: {error}"
    schema = json.loads(guided.spec)
    keys = re.search(r"Unimplemented keys: \[(.*?)\]", error)
    names = re.findall(r'"([^"]+)"', keys.group(1)) if keys else []
    if not names:
        names = [k for k in ("oneOf", "if", "then", "else", "not", "dependentSchemas", "patternProperties",
                             "unevaluatedProperties", "contains") if k in error]
    places = [p for p in (_pointer(schema, k) for k in names) if p]
    if places:
        return f"the JSON schema uses keywords this server cannot enforce: {', '.join(places)} ({error})"
    return f"the JSON schema cannot be enforced: {error}"



class Grammar:
    """A compiled constraint: a matcher in its start state, copied for each request."""

    def __init__(self, template):
        self._template = template
        self._lock = threading.Lock()

    def matcher(self):
        with self._lock:  # a copy reads the template, which no one advances
            return self._template.deep_copy()


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary (the model's logits width), with a
    bounded cache, llguidance's limits and a wall-clock limit. Thread-safe; the llguidance
    tokenizer is built on first use (~0.3 s for a 49k vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, *, timeout_s: float = 2.0, cache_size: int = 256,
                 threads: int = 2):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.timeout_s = timeout_s
        self.words = (vocab_size + 31) // 32  # int32 words of one row's mask
        self._cache: collections.OrderedDict[Guided, Grammar | str] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pending: dict[Guided, concurrent.futures.Future] = {}
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ll_tokenizer = None
        self._executor = None

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=list(self.tokenizer.eos_ids) or None)
            return self._ll_tokenizer

    @property
    def executor(self):
        """llguidance's thread pool, which fills the rows of a mask in parallel."""
        with self._lock:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor(self._threads)
            return self._executor

    def compile(self, guided: Guided) -> Grammar:
        """The constraint compiled, or RequestError naming why not (also when it takes longer than
        timeout_s; it is then remembered as refused)."""
        guided.check()
        with self._lock:
            done = self._cache.get(guided)
            if done is not None:
                self._cache.move_to_end(guided)
            else:
                future = self._pending.get(guided)
                if future is None:
                    if self._pool is None:
                        self._pool = concurrent.futures.ThreadPoolExecutor(
                            self._threads, thread_name_prefix="meshserve-grammar")
                    future = self._pending[guided] = self._pool.submit(self._build, guided)
        if done is None:
            try:
                done = future.result(timeout=self.timeout_s)
            except concurrent.futures.TimeoutError:
                raise ConstraintError(f"the {_NAMES[guided.kind]} did not compile within "
                                      f"{self.timeout_s:g} s") from None
        if isinstance(done, str):
            raise ConstraintError(done)
        return done

    def _build(self, guided: Guided) -> Grammar | str:
        import llguidance

        t0 = time.perf_counter()
        try:
            try:
                text = _grammar_text(guided)
            except RequestError as e:
                result: Grammar | str = str(e)
            else:
                matcher = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0)
                if not matcher.is_error():  # the first mask builds the lexer's start: part of compiling
                    row = np.empty((1, self.words), np.int32)
                    import llguidance.numpy as llnp

                    llnp.fill_next_token_bitmask(matcher, row)
                if matcher.is_error():
                    result = _explain(guided, matcher.get_error())
                elif time.perf_counter() - t0 > self.timeout_s:
                    result = f"the {_NAMES[guided.kind]} did not compile within {self.timeout_s:g} s"
                else:
                    result = Grammar(matcher)
        except Exception as e:  # llguidance's API errors: this constraint's fault, never the caller's thread's
            result = f"the {_NAMES[guided.kind]} does not compile: {e}"
        with self._lock:
            self._pending.pop(guided, None)
            self._cache[guided] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarError(Exception):
    """A request's matcher cannot go on (it accepted a token its grammar forbids, or has no token left)."""


def fill_masks(compiler: GrammarCompiler, rows: Sequence[tuple[Any, int]], mask: np.ndarray) -> None:
    """Fill `mask`'s rows of each (matcher, row) in parallel (llguidance's threads, GIL released);
    GrammarError when a matcher is in error or allows no token."""
    import llguidance.numpy as llnp

    for matcher, _ in rows:
        if matcher.is_error():
            raise GrammarError(f"structured output: {matcher.get_error()}")
    llnp.fill_next_token_bitmask_par(compiler.executor, list(rows), mask)
    for matcher, row in rows:
        if matcher.is_error() or not mask[row].any():
            raise GrammarError(f"structured output: no token can follow ({matcher.get_error() or 'empty mask'})")


def all_allowed(rows: int, words: int) -> np.ndarray:
    return np.full((rows, words), -1, np.int32)
