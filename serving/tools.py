"""Tool calling: a request's tools into the prompt, and the model's tool calls out of its text, in the
OpenAI shapes, for every frontend.

    calling = ToolCalling.parse(tools, tool_choice, parallel_tool_calls)   # RequestError naming the field
    guided = calling.guided()          # what the output must match: `required` and a named function
    messages = render_messages(messages, calling, template)                # tools into the chat
    stream = ToolStream(calling)       # text in, OpenAI deltas out: content and tool calls
    deltas = stream.feed(text) … stream.finish()

How the output is read, by `tool_choice`:
  - a named function: the output is constrained to its parameters' schema and is its arguments;
  - `required`: constrained to a JSON array of {"name", "parameters"} objects, one schema per tool
    (at most one item without `parallel_tool_calls`), each item a call;
  - `auto`: free text, read in the Hermes format (SmolLM2, Qwen2/Qwen3, Hermes): each call a JSON
    object {"name", "arguments"} between <tool_call> and </tool_call>; the rest is the content.
    A block whose JSON is not a call of a given tool stays in the content, as the model wrote it.
  - `none`: no tools in the prompt, nothing read.
A chat template that renders tools itself (it names `tools`) is given them; another gets them as a
system message in the Hermes format, and earlier calls and results in the same format.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from meshserve.models.errors import RequestError
from meshserve.runtime.grammar import Guided

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CHOICES = ("none", "auto", "required")


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = dataclasses.field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def body(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    tools: tuple[Tool, ...]
    choice: str  # auto | required | named
    name: str | None = None  # the named function
    parallel: bool = True

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any = None, parallel: Any = None) -> "ToolCalling | None":
        """The request's tool fields (None: no tools offered, or tool_choice none)."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise RequestError("tool_choice: no tools were given")
            return None
        if not isinstance(tools, list):
            raise RequestError("tools must be a list of tools")
        parsed = []
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise RequestError(f"{where} must be an object of type function")
            fn = tool.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise RequestError(f"{where}.function.name must be a non-empty string")
            params = fn.get("parameters")
            if params is None:
                params = {"type": "object", "properties": {}}
            if not isinstance(params, dict):
                raise RequestError(f"{where}.function.parameters must be a JSON schema object")
            description = fn.get("description") or ""
            if not isinstance(description, str):
                raise RequestError(f"{where}.function.description must be a string")
            parsed.append(Tool(fn["name"], description, params))
        names = [t.name for t in parsed]
        if len(set(names)) != len(names):
            raise RequestError("tools: two tools have the same name")
        if parallel is not None and not isinstance(parallel, bool):
            raise RequestError("parallel_tool_calls must be true or false")
        choice, name = tool_choice if tool_choice is not None else "auto", None
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise RequestError('tool_choice must be none, auto, required or {"type": "function", '
                                   '"function": {"name": …}}')
            if fn["name"] not in names:
                raise RequestError(f"tool_choice: no tool is named {fn['name']!r}")
            choice, name = "named", fn["name"]
        elif choice not in CHOICES:
            raise RequestError(f"tool_choice must be none, auto, required or a named function, got {choice!r}")
        if choice == "none":
            return None
        return cls(tuple(parsed), choice, name, True if parallel is None else parallel)

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def guided(self) -> Guided | None:
        """The constraint that enforces `required` and a named function (auto: none)."""
        if self.choice == "named":
            return Guided.json_schema(self.tool(self.name).parameters)
        if self.choice == "required":
            items = [{"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
            if not self.parallel:
                schema["maxItems"] = 1
            return Guided.json_schema(schema)
        return None

    def system_prompt(self) -> str:
        """The tools as a system message, for a chat template that does not render them (Hermes format)."""
        listed = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in self.tools)
        return ("You can call functions to answer the user. The functions, one JSON signature per line:\n"
                f"<tools>\n{listed}\n</tools>\n"
                f"To call a function, write a JSON object with its name and arguments between {OPEN} and {CLOSE}:\n"
                f'{OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n{CLOSE}')


def render_messages(messages: list[dict], calling: ToolCalling | None, native: bool) -> tuple[list[dict], list | None]:
    """(messages, tools) for the chat template. `native`: the template renders tools and tool calls
    itself (it is given them as they came); otherwise the tools go into a system message and earlier
    calls and results into the text, in the Hermes format."""
    if native:
        return messages, [t.spec() for t in calling.tools] if calling is not None else None
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [f'{OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)})}\n{CLOSE}'
                     for c in m.pop("tool_calls")]
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + calls)
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        m.pop("tool_call_id", None)
        m.pop("name", None)
        out.append(m)
    if calling is not None:
        prompt = calling.system_prompt()
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _arguments(call: dict) -> Any:
    """An earlier call's arguments (JSON text in the OpenAI shape) as JSON, for the Hermes format."""
    text = call["function"].get("arguments") or "{}"
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolStream:
    """The model's text in, OpenAI message deltas out ({"content": …} and {"tool_calls": […]}), by
    `tool_choice` (the module's docstring). Feeding the whole text at once or in any pieces gives
    the same calls and the same content."""

    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self._buffer = ""
        self._in_call = False
        self._spaces = ""  # whitespace held back: dropped before a call and at the end
        self._started = False  # any content sent (leading whitespace is dropped)

    def feed(self, text: str) -> list[dict]:
        if self.calling.choice == "named":
            return self._named(text)
        self._buffer += text
        if self.calling.choice == "required":
            return []  # read whole at the end
        out: list[dict] = []
        while True:
            if not self._in_call:
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, OPEN)
                    self._say(self._buffer[:len(self._buffer) - keep], out)
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                self._say(self._buffer[:at], out)  # its trailing whitespace waits: a call drops it
                self._buffer, self._in_call = self._buffer[at + len(OPEN):], True
            else:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return out
                self._block(self._buffer[:end], True, out)
                self._buffer, self._in_call = self._buffer[end + len(CLOSE):], False

    def finish(self) -> list[dict]:
        """What is left, at the end of the output."""
        out: list[dict] = []
        if self.calling.choice == "named":
            if not self.calls:  # no text at all: a call with empty arguments
                out += self._named("")
            return out
        if self.calling.choice == "required":
            self._required(self._buffer, out)
        elif self._in_call:  # ended before its closing tag (EOS or a stop string): a call if it parses
            self._block(self._buffer, False, out)
        else:
            self._say(self._buffer, out)
        self._buffer = ""
        return out

    def _named(self, text: str) -> list[dict]:
        if not self.calls:
            self.calls.append(ToolCall(self.calling.name, text))
            return [{"tool_calls": [{"index": 0, **self.calls[0].body()}]}]
        call = self.calls[0]
        self.calls[0] = dataclasses.replace(call, arguments=call.arguments + text)
        return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}] if text else []

    def _required(self, text: str, out: list[dict]) -> None:
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(self._call_of(i, "parameters") for i in items):
            self._say(text, out)  # cut short (max_tokens): the text as it is
            return
        for item in items:
            self._emit(ToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)), out)

    def _block(self, body: str, closed: bool, out: list[dict]) -> None:
        try:
            item = json.loads(body)
        except ValueError:
            item = None
        if self._call_of(item, "arguments"):
            self._spaces = ""
            self._emit(ToolCall(item["name"], json.dumps(item.get("arguments", {}), ensure_ascii=False)), out)
        else:
            self._say(OPEN + body + (CLOSE if closed else ""), out)

    def _call_of(self, item: Any, key: str) -> bool:
        return (isinstance(item, dict) and isinstance(item.get("name"), str) and self.calling.tool(item["name"])
                is not None and isinstance(item.get(key, {}), dict))

    def _emit(self, call: ToolCall, out: list[dict]) -> None:
        out.append({"tool_calls": [{"index": len(self.calls), **call.body()}]})
        self.calls.append(call)

    def _say(self, text: str, out: list[dict]) -> None:
        """Content, less leading whitespace and whitespace that a call or the end follows."""
        if not self._started:
            text = text.lstrip()
        if not text:
            return
        body = text.rstrip()
        if not body:
            self._spaces += text
            return
        text, self._spaces = self._spaces + body, text[len(body):]
        self._started = True
        self.content.append(text)
        out.append({"content": text})


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back: the tag may be arriving)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def read_all(calling: ToolCalling, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content or None, tool calls) of a whole output."""
    stream = ToolStream(calling)
    stream.feed(text)
    stream.finish()
    content = "".join(stream.content)
    return (content or None), stream.calls
