"""Tool calling (serving/tools.py): the request's fields, the constraints of `required` and a named
function, tools in the prompt, and tool calls read from model text — whole or in any pieces."""

import json

import jsonschema
import pytest

from meshserve.models.errors import RequestError
from meshserve.serving.tools import ToolCalling, ToolStream, read_all, render_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
AUTO = ToolCalling.parse([WEATHER, TIME])

# what a model writes in the Hermes format, and what must be read from it: (content, [(name, arguments)])
FIXTURES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_time", {"zone": "CET"})]),
    ('The answer is 4 < 5, and <tool_call> is how I call tools.', 'The answer is 4 < 5, and <tool_call> is how I '
     'call tools.', []),  # an unclosed block that is no call: content as written
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich – 東京"}}', None,
     [("get_weather", {"city": "Zürich – 東京"})]),  # cut before its closing tag (EOS): still a call
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> done', '<tool_call>{"name": "rm_rf", '
     '"arguments": {}}</tool_call> done', []),  # not a given tool: left as text
    ('  plain text, no calls  ', "plain text, no calls", []),
]


@pytest.mark.parametrize("text,content,calls", FIXTURES)
def test_auto_reads_the_same_calls_from_every_split_of_the_text(text, content, calls):
    whole = read_all(AUTO, text)
    assert whole[0] == content
    assert [(c.name, json.loads(c.arguments)) for c in whole[1]] == calls
    for cut in range(len(text) + 1):  # in two pieces, at every boundary
        for pieces in ([text[:cut], text[cut:]], list(text) if cut == 0 else None):
            if pieces is None:
                continue
            stream = ToolStream(AUTO)
            deltas = [d for p in pieces for d in stream.feed(p)] + stream.finish()
            said = "".join(d.get("content", "") for d in deltas)
            got = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
            assert (said or None) == content, (cut, said)
            assert [(g["function"]["name"], json.loads(g["function"]["arguments"])) for g in got] == calls
            assert [g["index"] for g in got] == list(range(len(calls)))


def test_required_and_named_are_enforced_by_schemas_the_calls_validate_against():
    required = ToolCalling.parse([WEATHER, TIME], "required", False)
    schema = json.loads(required.guided().spec)
    output = [{"name": "get_time", "parameters": {"zone": "UTC"}}]
    jsonschema.validate(output, schema)
    with pytest.raises(jsonschema.ValidationError):  # one call only without parallel_tool_calls
        jsonschema.validate(output * 2, schema)
    with pytest.raises(jsonschema.ValidationError):  # arguments outside the tool's schema
        jsonschema.validate([{"name": "get_weather", "parameters": {"city": 3}}], schema)
    content, calls = read_all(required, json.dumps(output))
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    named = ToolCalling.parse([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.guided().spec) == WEATHER["function"]["parameters"]
    stream = ToolStream(named)
    deltas = stream.feed('{"city": ') + stream.feed('"Rome"}') + stream.finish()
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": '}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Rome"}'
    assert ToolCalling.parse([WEATHER], "none") is None and ToolCalling.parse(None) is None


@pytest.mark.parametrize("tools,choice,message", [
    ("get_weather", None, "tools must be a list"),
    ([{"type": "function", "function": {"name": ""}}], None, r"tools\[0\].function.name"),
    ([{"type": "retrieval"}], None, r"tools\[0\] must be an object of type function"),
    ([WEATHER, WEATHER], None, "two tools have the same name"),
    ([WEATHER], "sometimes", "tool_choice must be none, auto, required or a named function"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "no tool is named 'nope'"),
    (None, "required", "tool_choice: no tools were given"),
])
def test_bad_tool_fields_are_named(tools, choice, message):
    with pytest.raises(RequestError, match=message):
        ToolCalling.parse(tools, choice)


def test_tools_and_earlier_calls_reach_a_template_that_does_not_render_them():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    messages, tools = render_messages(history, AUTO, native=False)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.") and '"name": "get_time"' in messages[0]["content"]
    assert json.loads(messages[2]["content"].split("\n")[1]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert messages[3]["content"] == "<tool_response>\n-3 C\n</tool_response>"
    native, tools = render_messages(history, AUTO, native=True)
    assert native == history and tools == [WEATHER, {**TIME, "function": {**TIME["function"], "description": ""}}]
