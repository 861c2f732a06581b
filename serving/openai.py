"""The OpenAI API's shapes: request bodies parsed and checked into meshserve's requests, responses
and stream chunks built from engine outputs. No I/O here (serving/http.py is the transport).

Fields are taken at their OpenAI meaning, with the extensions benchmark and evaluation tools send
(vLLM's: ignore_eos, min_tokens, top_k, min_p, repetition_penalty, stop_token_ids,
stream_options.continuous_usage_stats, and its structured-output fields: structured_outputs,
guided_json, guided_regex, guided_choice, guided_grammar), and meshserve's num_speculative_tokens
(at most that many drafts a step for this request, 0: none, on a server that speculates). Fields
whose behaviour meshserve cannot give yet are refused with 400 naming them, never dropped; other
unknown fields are ignored.
Structured outputs and tools: runtime/grammar.py and serving/tools.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from typing import Any

from meshserve.models.errors import MeshserveError, RequestError
from meshserve.runtime.engine import TokenLogprob
from meshserve.runtime.grammar import Guided
from meshserve.runtime.sampling import MAX_LOGPROBS, f32_number
from meshserve.serving.preprocess import Prompt
from meshserve.serving.tools import ToolCalling, ToolStream, read_all

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_N = 16  # samples per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions call

# Known fields whose behaviour is not offered yet: 400 naming the field, unless given the neutral value.
REFUSED = {
    "suffix": (None, ""),
    "functions": (None, []),  # the deprecated form of tools
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}
# vLLM's structured-output fields (guided_* and structured_outputs' keys) → the constraint's kind
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class APIError(MeshserveError):
    """An error answered in the OpenAI envelope: {"error": {"message", "type", "param", "code"}}."""

    # by status; another 4xx is an invalid_request_error, another 5xx a server_error
    TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}

    @property
    def outcome(self) -> str:
        """The outcome a call it ends is counted under (serving/session.py)."""
        named = {413: "too_large", 401: "unauthenticated", 429: "rejected", 503: "unavailable"}
        return named.get(self.status, "invalid" if self.status < 500 else "error")


def invalid(message: str, param: str | None) -> APIError:
    return APIError(400, message, param, "invalid_value" if param else None)


# ---- requests -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
    """One OpenAI generation call, parsed: prompts × n choices, each a meshserve request."""

    chat: bool
    model: str | None
    prompts: list[Prompt]
    prompt_texts: list[str | None]  # the prompt as text when given as text (echo), else None
    sampling: dict[str, Any]  # SamplingParams fields given
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo: bool
    logprobs: int | None  # top-N per token (completions: `logprobs`; chat: `top_logprobs` when logprobs)
    score_only: bool  # max_tokens 0 with echo: the prompt's scores, nothing generated
    tools: ToolCalling | None = None  # chat: the tools offered, and how their calls are read
    guided_field: str | None = None  # the field that carried the output's constraint (its errors name it)

    def seeds(self) -> list[int | None]:
        """Per choice: the request's seed for the first, derived ones for the rest (n > 1 must
        sample n different completions, reproducibly)."""
        seed = self.sampling.get("seed")
        if seed is None:
            return [None] * self.n
        derived = lambda i: int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).digest(), "little")
        return [seed] + [derived(i) % 2**31 for i in range(1, self.n)]


class _Body:
    """Typed reads of a JSON object's fields, each error naming its field."""

    def __init__(self, data: Any):
        if not isinstance(data, dict):
            raise invalid("the request body must be a JSON object", None)
        self.data = data

    def get(self, name: str, kinds: tuple[type, ...], default=None, *, what: str = ""):
        value = self.data.get(name)
        if value is None:
            return default
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
            number = f32_number(value)
            if number is None:
                raise invalid(f"{name} must be a finite number within float32's range, got {_short(value)}", name)
            ok, value = True, number
        if not ok:
            raise invalid(f"{name} must be {what or ' or '.join(k.__name__ for k in kinds)}, got {_short(value)}",
                          name)
        return value

    def refuse_unsupported(self) -> None:
        for name, neutral in REFUSED.items():
            if name in self.data and self.data[name] not in neutral:
                raise invalid(f"{name} is not supported by this server", name)
        best_of = self.data.get("best_of")
        if best_of not in (None, 1) and best_of != self.data.get("n", 1):
            raise invalid("best_of other than n is not supported by this server", "best_of")


def _short(value: Any) -> str:
    """A value for an error message, cut short (a 4,000-digit integer is not echoed back whole)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {len(str(value))} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _stop(body: _Body) -> tuple[str, ...]:
    stop = body.data.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings", "stop")
    return tuple(s for s in stops if s)


def _logit_bias(body: _Body) -> tuple[tuple[int, float], ...]:
    bias = body.data.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise invalid("logit_bias must be an object mapping token ids to biases", "logit_bias")
    out = []
    for key, value in bias.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise invalid(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        number = f32_number(value)
        if number is None:
            raise invalid(f"logit_bias: the bias of token {key} must be a finite number", "logit_bias")
        out.append((tid, number))
    return tuple(out)


# The API's own defaults, below the model's (Preprocessor.prepare): OpenAI samples, not greedy.
API_DEFAULTS = {"temperature": 1.0}


def _sampling(body: _Body) -> dict[str, Any]:
    """SamplingParams fields shared by both endpoints (the ones a request set)."""
    values: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        value = body.get(name, (float, int))
        if value is not None:
            values[name] = value
    for name in ("seed", "min_tokens", "num_speculative_tokens"):
        value = body.get(name, (int,))
        if value is not None:
            values[name] = value
    top_k = body.get("top_k", (int,))
    if top_k is not None:
        values["top_k"] = 0 if top_k == -1 else top_k  # -1 is "off" to vLLM's clients
    if body.get("seed", (int,)) is not None and not 0 <= values["seed"] < 2**31:
        values["seed"] %= 2**31  # OpenAI takes any int64 seed
    values["stop"] = _stop(body)
    ids = body.data.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise invalid("stop_token_ids must be a list of token ids", "stop_token_ids")
        values["stop_token_ids"] = tuple(ids)
    values["ignore_eos"] = body.get("ignore_eos", (bool,), False)
    values["logit_bias"] = _logit_bias(body)
    found = _guided(body)
    if found is not None:
        values["guided_field"], values["guided"] = found
    return values


def _guided(body: _Body) -> tuple[str, Guided] | None:
    """The output's constraint: response_format, or one of vLLM's fields (400 for more than one)."""
    found: list[tuple[str, Guided]] = []
    try:
        fmt = body.data.get("response_format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
                raise invalid("response_format must be an object of type text, json_object or json_schema",
                              "response_format")
            if fmt["type"] == "json_object":
                found.append(("response_format", Guided("json_object")))
            elif fmt["type"] == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
                    raise invalid("response_format.json_schema must be an object with a name and a schema",
                                  "response_format")
                if not isinstance(spec.get("strict", False), (bool, type(None))):
                    raise invalid("response_format.json_schema.strict must be true or false", "response_format")
                schema = spec.get("schema", {"type": "object"})  # OpenAI's default: any object
                found.append(("response_format", Guided.json_schema(schema)))
        for name, kind in GUIDED_FIELDS.items():
            value = body.data.get(name)
            if value is not None:
                found.append((name, _guided_value(kind, value, name)))
        so = body.data.get("structured_outputs")
        if so is not None:
            if not isinstance(so, dict):
                raise invalid("structured_outputs must be an object", "structured_outputs")
            for key, value in so.items():
                if value is None or value is False:
                    continue
                if key == "json_object":
                    found.append(("structured_outputs", Guided("json_object")))
                elif key in ("json", "regex", "choice", "grammar"):
                    found.append(("structured_outputs", _guided_value(key, value, f"structured_outputs.{key}")))
                else:
                    raise invalid(f"structured_outputs.{key} is not supported by this server", "structured_outputs")
    except RequestError as e:
        raise invalid(str(e), found[-1][0] if found else "response_format") from None
    if len(found) > 1:
        raise invalid(f"give one output constraint, got {' and '.join(n for n, _ in found)}", found[1][0])
    return found[0] if found else None


def _guided_value(kind: str, value: Any, field: str) -> Guided:
    try:
        if kind == "json":
            return Guided.json_schema(json.loads(value) if isinstance(value, str) else value)
        if kind == "choice":
            return Guided.choice(value)
    except (RequestError, ValueError) as e:
        raise invalid(f"{field}: {e}", field.split(".")[0]) from None
    if not isinstance(value, str):
        raise invalid(f"{field} must be a string", field.split(".")[0])
    return Guided(kind, value)


def _stream_options(body: _Body, stream: bool) -> tuple[bool, bool]:
    options = body.data.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    opts = _Body(options)
    include = opts.get("include_usage", (bool,), False)
    return include, include and opts.get("continuous_usage_stats", (bool,), False)  # as vLLM: only with it


def _n(body: _Body) -> int:
    n = body.get("n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise invalid(f"n must be in [1, {MAX_N}], got {n}", "n")
    return n


def parse_completion(data: Any) -> Generation:
    body = _Body(data)
    body.refuse_unsupported()
    prompt = data.get("prompt")
    if prompt is None:
        raise invalid("prompt is required", "prompt")
    prompts, texts = _prompts(prompt)
    stream = body.get("stream", (bool,), False)
    include_usage, continuous = _stream_options(body, stream)
    echo = body.get("echo", (bool,), False)
    logprobs = body.get("logprobs", (int,))
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise invalid(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    sampling = _sampling(body)
    guided_field = sampling.pop("guided_field", None)
    max_tokens = body.get("max_tokens", (int,), DEFAULT_COMPLETION_TOKENS)
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise invalid(f"max_tokens must be positive (0 only with echo), got {max_tokens}", "max_tokens")
    sampling["max_tokens"] = max(1, max_tokens)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
        if echo:
            sampling["prompt_logprobs"] = logprobs
    return Generation(False, body.get("model", (str,)), prompts, texts, sampling, _n(body), stream, include_usage,
                      continuous, echo, logprobs, max_tokens == 0, guided_field=guided_field)


def _prompts(prompt: Any) -> tuple[list[Prompt], list[str | None]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    def ids(value, where):
        if not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise invalid(f"{where} must be a non-empty list of token ids", "prompt")
        return Prompt(token_ids=list(value))

    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [ids(prompt, "prompt")], [None]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise invalid("prompt must be a string, a list of strings, token ids or lists of token ids", "prompt")
    if len(items) > MAX_PROMPTS:
        raise invalid(f"prompt: {len(items)} prompts, at most {MAX_PROMPTS} allowed", "prompt")
    prompts, texts = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid("prompt is empty", "prompt")
            prompts.append(Prompt(text=item))
            texts.append(item)
        elif isinstance(item, list):
            prompts.append(ids(item, f"prompt[{i}]"))
            texts.append(None)
        else:
            raise invalid(f"prompt[{i}] must be a string or a list of token ids", "prompt")
    return prompts, texts


def parse_chat(data: Any) -> Generation:
    body = _Body(data)
    body.refuse_unsupported()
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    stream = body.get("stream", (bool,), False)
    include_usage, continuous = _stream_options(body, stream)
    sampling = _sampling(body)
    guided_field = sampling.pop("guided_field", None)
    try:
        tools = ToolCalling.parse(data.get("tools"), data.get("tool_choice"), data.get("parallel_tool_calls"))
    except RequestError as e:
        field = str(e).split(" ", 1)[0].split("[", 1)[0].split(":", 1)[0]
        raise invalid(str(e), field if field in ("tools", "tool_choice", "parallel_tool_calls") else "tools") from None
    if tools is not None and tools.guided() is not None:
        if "guided" in sampling:
            raise invalid(f"tool_choice {tools.choice if tools.name is None else repr(tools.name)} constrains the "
                          "output already: drop response_format", "response_format")
        sampling["guided"], guided_field = tools.guided(), "tools"
    max_tokens = body.get("max_completion_tokens", (int,))
    if max_tokens is None:
        max_tokens = body.get("max_tokens", (int,))
    if max_tokens is not None:
        if max_tokens < 1:
            raise invalid(f"max_completion_tokens must be positive, got {max_tokens}", "max_completion_tokens")
        sampling["max_tokens"] = max_tokens
    logprobs = None
    if body.get("logprobs", (bool,), False):
        logprobs = body.get("top_logprobs", (int,), 0)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise invalid(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", "top_logprobs")
        sampling["logprobs"] = logprobs
    elif body.get("top_logprobs", (int,)) is not None:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    return Generation(True, body.get("model", (str,)), [Prompt(messages=parsed, tools=tools)], [None], sampling,
                      _n(body), stream, include_usage, continuous, False, logprobs, False, tools, guided_field)


def _message(m: Any, i: int) -> dict:
    """A chat message: role and text content, and an assistant's earlier tool calls or a tool's
    result (tool_call_id) as the OpenAI shapes give them."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise invalid(f"messages[{i}] must be an object with a role", "messages")
    out = {"role": m["role"], "content": _content(m.get("content"), i)}
    calls = m.get("tool_calls")
    if calls is not None and m["role"] == "assistant":
        if not isinstance(calls, list):
            raise invalid(f"messages[{i}].tool_calls must be a list", "messages")
        for k, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                    or not isinstance(fn.get("arguments", ""), str)):
                raise invalid(f"messages[{i}].tool_calls[{k}] must have a function with a name and arguments "
                              "(JSON text)", "messages")
        out["tool_calls"] = [{"id": c.get("id"), "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": c["function"].get("arguments", "")}} for c in calls]
    if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"messages[{i}].content: only text parts are supported, got {kind!r}", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"messages[{i}].content must be a string or a list of content parts", "messages")


# ---- responses ------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


@dataclasses.dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: tuple = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Shaper:
    """Builds response bodies and stream chunks; `token_text` names one token id as text, `decode`
    turns token ids into text."""

    def __init__(self, call: Generation, model: str, token_text, decode):
        self.call, self.model, self.token_text, self.decode = call, model, token_text, decode
        self.id, self.created = new_id(call.chat), int(time.time())
        self.object = "chat.completion" if call.chat else "text_completion"

    def _envelope(self, choices: list, obj: str | None = None) -> dict:
        return {"id": self.id, "object": obj or self.object, "created": self.created, "model": self.model,
                "choices": choices, "system_fingerprint": None}

    # completions: OpenAI's legacy logprobs object, over the echoed prompt too
    def completion_logprobs(self, entries: list[TokenLogprob | None], prompt_ids: list[int], offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for i, entry in enumerate(entries):
            tid = prompt_ids[i] if entry is None else entry.token_id
            text = self.token_text(tid)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_logprobs.append(None if entry is None else entry.logprob)
            top.append(None if entry is None else self._top(entry))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        """{text: logprob}, best first; of two tokens with the same text, the likelier one's."""
        top: dict[str, float] = {}
        for tid, lp in entry.top:
            top.setdefault(self.token_text(tid), lp)
        return top

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(tid, lp):
            text = self.token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def response(self, choices: list[Choice], prompt_ids: list[list[int]]) -> dict:
        out = []
        for choice in choices:
            text = "".join(choice.text)
            if self.call.chat:
                message, reason = {"role": "assistant", "content": text}, choice.finish_reason
                if self.call.tools is not None:
                    content, calls = read_all(self.call.tools, text)
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = [c.body() for c in calls]
                        reason = "tool_calls" if reason == "stop" else reason
                body = {"index": choice.index, "message": message,
                        "logprobs": self.chat_logprobs(choice.logprobs) if self.call.logprobs is not None else None,
                        "finish_reason": reason}
            else:
                body = self._completion_choice(choice, text, prompt_ids[choice.index // self.call.n])
            out.append(body)
        result = self._envelope(out)
        result["usage"] = self.usage_of(choices)
        return result

    def _completion_choice(self, choice: Choice, text: str, prompt: list[int]) -> dict:
        call = self.call
        echoed = self.echo_text(choice.index, prompt) if call.echo else ""
        entries = list(choice.prompt_logprobs) if call.echo else []
        if call.score_only:
            text, completion = "", []
        else:
            completion = choice.logprobs
        logprobs = None
        if call.logprobs is not None:
            start = 0 if call.echo else len(self.echo_text(choice.index, prompt))
            logprobs = self.completion_logprobs(entries + list(completion), prompt, start)
        return {"index": choice.index, "text": echoed + text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason}

    def echo_text(self, index: int, prompt_ids: list[int]) -> str:
        given = self.call.prompt_texts[index // self.call.n]
        return given if given is not None else self.decode(prompt_ids)

    def usage_of(self, choices: list[Choice]) -> dict:
        n = self.call.n
        prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
        cached = sum(c.cached_tokens for c in choices if c.index % n == 0)
        completion = 0 if self.call.score_only else sum(len(c.token_ids) for c in choices)
        return usage(prompt, completion, cached)

    # streams
    def chunk(self, index: int, *, text: str = "", role: bool = False, logprobs=None,
              finish_reason: str | None = None) -> dict:
        if self.call.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return self._envelope([choice], "chat.completion.chunk")
        return self._envelope([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])

    def delta_chunk(self, index: int, delta: dict, logprobs=None, finish_reason: str | None = None) -> dict:
        """A chat chunk of any delta (tool calls)."""
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope([choice], "chat.completion.chunk")

    def tool_stream(self) -> ToolStream | None:
        """A chat choice's reader of tool calls, when tools were offered."""
        return ToolStream(self.call.tools) if self.call.tools is not None else None

    def usage_chunk(self, choices: list[Choice]) -> dict:
        obj = "chat.completion.chunk" if self.call.chat else None
        return {**self._envelope([], obj), "usage": self.usage_of(choices)}
