"""Request preprocessing, shared by every frontend: a prompt (text, token ids or chat messages) and
sampling values in, a checked `Request` (runtime/request.py) out — tokenized, defaults filled, every
value checked against the engine's limits once, here, so what reaches the engine thread is known to
be servable and is not checked again.

Tokenizing a long prompt or rendering a chat template takes real time (seconds for megabytes), so
frontends run `prepare` on this module's small thread pool, never on their event loop; the
tokenizer releases the GIL for long texts (models/tokenizer.py), so other streams keep flowing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import uuid
from typing import Any, Mapping, Sequence

from meshserve.models.errors import RequestError
from meshserve.runtime.request import Request, check_request
from meshserve.runtime.sampling import SamplingParams
from meshserve.serving.info import EngineInfo
from meshserve.serving.tools import ToolCalling, render_messages

ROLES = ("system", "developer", "user", "assistant", "tool")  # the chat roles a request may use
MAX_REQUEST_ID = 256
DEFAULT_MAX_TOKENS = 256  # when a request sets none: this many, within the context
THREADS = 2


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Exactly one of the three is set by a valid request."""

    text: str | None = None
    token_ids: Sequence[int] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None  # {"role", "content"}, tool_calls, tool_call_id
    tools: ToolCalling | None = None  # with messages: the tools offered (serving/tools.py)


def _unicode(text: str, field: str) -> str:
    if not isinstance(text, str):
        raise RequestError(f"{field} must be a string")
    try:
        text.encode("utf-8")  # a lone surrogate (possible from JSON) is not text
    except UnicodeEncodeError:
        raise RequestError(f"{field} is not valid Unicode text") from None
    return text


class Preprocessor:
    def __init__(self, info: EngineInfo, threads: int = THREADS):
        self.tokenizer = info.tokenizer
        self.info = info
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="meshserve-preprocess")
        # the longest text that could fit the context: anything longer is refused untokenized
        self.max_text_chars = info.context_length * self.tokenizer.max_token_chars

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on the preprocessing threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # ---- the steps -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """Token ids of the one input a request gives (`add_special_tokens=False`: text without
        the BOS the tokenizer would add)."""
        given = [name for name in ("text", "token_ids", "messages") if getattr(prompt, name)]
        if len(given) != 1:
            raise RequestError("input: set exactly one of text, token_ids, messages"
                               + (f" (got {' and '.join(given)})" if given else " (got none)"))
        if prompt.text:
            self._fits(len(prompt.text) if isinstance(prompt.text, str) else 0, "text")
            return self.tokenizer.encode(_unicode(prompt.text, "text"), add_bos=None if add_special_tokens else False)
        if prompt.token_ids:
            return list(prompt.token_ids)
        self._fits(sum(len(m.get("content", "")) for m in prompt.messages
                       if isinstance(m, Mapping) and isinstance(m.get("content", ""), str)), "messages")
        messages = []
        for i, m in enumerate(prompt.messages):
            role = _unicode(m.get("role", ""), f"messages[{i}].role")
            if not role:
                raise RequestError(f"messages[{i}].role is empty")
            if role not in ROLES:
                raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role[:40]!r}")
            messages.append({**m, "role": role, "content": _unicode(m.get("content", ""), f"messages[{i}].content")})
        template = self.tokenizer.config.chat_template or ""
        messages, tools = render_messages(messages, prompt.tools, native="tools" in template)
        try:
            return self.tokenizer.encode_chat(messages, tools=tools)
        except Exception as e:  # a template error names what was wrong with the messages
            raise RequestError(f"messages: the chat template failed: {e}") from None

    def _fits(self, chars: int, field: str) -> None:
        """Refuse, before tokenizing it, a text too long to fit the context whatever its tokens."""
        if chars > self.max_text_chars:
            raise RequestError(f"{field}: {chars} characters cannot fit the context of {self.info.context_length} "
                               f"tokens (at most {self.max_text_chars} characters)")

    def decode(self, token_ids: Sequence[int]) -> str:
        vocab = self.info.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token_ids: {bad} is outside the vocabulary (size {vocab})")
        return self.tokenizer.decode(list(token_ids))

    def prepare(self, prompt: Prompt, sampling: Mapping[str, Any], *, priority: int = 0,
                request_id: str | None = None, arrival: float,
                default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
                api_defaults: Mapping[str, Any] | None = None) -> Request:
        """Raises RequestError naming the first problem. Unset sampling fields take the server's
        sampling defaults (the model's), then the API's own (`api_defaults`). Without max_tokens:
        `default_max_tokens` within the context (None: the whole rest of the context)."""
        if request_id is not None and (len(request_id) > MAX_REQUEST_ID or not request_id.isprintable()):
            raise RequestError(f"request_id must be printable and at most {MAX_REQUEST_ID} characters")
        ids = self.encode(prompt)
        values = {**(api_defaults or {}), **self.info.sampling_defaults, **sampling}
        for name, value in values.items():  # text fields of the sampling options, checked like the prompt's
            if name == "stop":
                values[name] = tuple(_unicode(s, "stop") for s in value)
            elif name == "stop_token_ids":
                values[name] = tuple(value)
        if "max_tokens" not in values:
            room = self.info.context_length - len(ids)
            values["max_tokens"] = max(1, room if default_max_tokens is None else min(default_max_tokens, room))
        return self.check(ids, SamplingParams(**values), priority, request_id=request_id or uuid.uuid4().hex,
                          arrival=arrival)

    def check(self, ids: Sequence[int], params: SamplingParams, priority: int = 0, **fields) -> Request:
        """The request, checked against the engine's limits (RequestError naming the first problem):
        the one check a request gets."""
        f = self.info
        check_request(ids, params, priority, vocab_size=f.vocab_size, max_seq_len=f.context_length,
                      priority_levels=f.priority_levels, limits=f.limits, eos_ids=len(f.eos_ids),
                      speculative_tokens=f.speculative_tokens)
        if params.guided is not None:  # compiled here, on these threads, never on the engine's
            fields["grammar"] = f.grammars.compile(params.guided)
        return Request(tuple(ids), params, priority, **fields)
