"""Structured outputs and tool calling through the OpenAI-compatible API, read by the real `openai`
client (its `parse()` with a pydantic model too), on a random-weight model that writes whatever the
grammar lets it: every answer must validate because the grammar held it, not because the model knew."""

import json
import threading
import time

import jsonschema
import openai
import pydantic
import pytest

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.serving.config import ServerConfig
from meshserve.serving.server import ServerThread
from tests.helpers import CHOICES, PERSON_SCHEMA, REGEX
from tests.runtime.test_grammar import deep_schema
from tests.serving.test_tools import TIME, WEATHER

TOKEN = "structured-token"
CONFIG = EngineConfig(page_size=16, kv_cache_bytes=2**24, max_seq_len=2048, max_num_seqs=16,
                      max_prefill_chunk=256, decode_buckets=(16,), prefill_buckets=(256,))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from meshserve.models.config import ModelConfig
    from tests.conftest import TINY_CONFIG
    from tests.helpers import random_checkpoint

    ckpt = random_checkpoint(ModelConfig(**{**TINY_CONFIG, "max_position_embeddings": 2048}),
                             tmp_path_factory.mktemp("tok"), seed=2)
    server = ServerConfig(port=0, metrics_port=None, http_port=0, auth_tokens=(TOKEN,))
    with ServerThread(server, lambda: Engine(ckpt, CONFIG)) as s:
        s.wait_ready()
        s.client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.server.http.port}/v1", api_key=TOKEN,
                                 max_retries=0, _strict_response_validation=True)
        # completion stream chunks carry finish_reason null, which the SDK's strict types refuse
        s.loose = openai.OpenAI(base_url=f"http://127.0.0.1:{s.server.http.port}/v1", api_key=TOKEN, max_retries=0)
        yield s


def chat(served, max_tokens=1500, **kw):
    return served.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "answer"}], temperature=1.0, max_tokens=max_tokens, **kw)


def test_response_format_and_vllms_fields_hold_the_output(served):
    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    for seed in range(3):
        out = chat(served, seed=seed, response_format=person).choices[0]
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.message.content), PERSON_SCHEMA)
        obj = chat(served, seed=seed, response_format={"type": "json_object"}).choices[0].message.content
        assert isinstance(json.loads(obj), dict)
    import re

    c = served.client.completions.create(model="tiny", prompt="x", max_tokens=40, temperature=1.0, seed=1,
                                         extra_body={"guided_regex": REGEX})
    assert re.fullmatch(REGEX, c.choices[0].text, re.ASCII) and c.choices[0].finish_reason == "stop"
    choice = chat(served, seed=2, extra_body={"structured_outputs": {"choice": CHOICES}}).choices[0].message.content
    assert choice in CHOICES
    streamed = chat(served, seed=0, stream=True, response_format=person)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_parse_with_a_pydantic_model(served):
    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=10)
        population: int = pydantic.Field(ge=0, le=10**6)
        coastal: bool

    parsed = served.client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "a city"}],
                                                  response_format=City, temperature=1.0, max_tokens=1500, seed=3)
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_required_and_named_tools_return_calls_that_validate(served):
    for seed, parallel in ((0, True), (1, False), (2, True)):
        out = chat(served, seed=seed, tools=[WEATHER, TIME], tool_choice="required",
                   parallel_tool_calls=parallel, max_tokens=1200).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None
        assert out.message.tool_calls and (parallel or len(out.message.tool_calls) == 1)
        for call in out.message.tool_calls:
            tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = chat(served, seed=5, tools=[WEATHER, TIME], tool_choice=named, max_tokens=1200).choices[0]
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and out.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed: the OpenAI delta shape, the client's accumulation gives the same call
    chunks = list(chat(served, seed=5, tools=[WEATHER, TIME], tool_choice=named, stream=True, max_tokens=1200))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    streamed = list(chat(served, seed=1, tools=[WEATHER, TIME], tool_choice="required", stream=True, max_tokens=1200))
    calls = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls and all(json.loads(c.function.arguments) is not None for c in calls)


def test_auto_sends_the_tools_in_the_prompt_and_reads_the_history(served):
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    with_tools = served.client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER],
                                                       max_tokens=3, temperature=0)
    without = served.client.chat.completions.create(model="tiny", messages=history, max_tokens=3, temperature=0)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 50  # the tools' signatures
    assert with_tools.choices[0].message.content is not None or with_tools.choices[0].message.tool_calls


def test_auto_reads_calls_from_the_output_streamed_or_not(served):
    """A model that writes a Hermes call (held to one by a regex here): the client gets tool_calls,
    whole or as stream deltas, and the text around them as content."""
    regex = r'Checking\. <tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}"\}\}\n</tool_call>'
    kw = dict(tools=[WEATHER, TIME], max_tokens=1000, extra_body={"guided_regex": regex})
    out = chat(served, seed=4, **kw).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content == "Checking."
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    chunks = [ch for ch in chat(served, seed=4, stream=True, **kw) if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Checking."
    (streamed,) = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("body,param,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "object", "dependentSchemas": {"b": {}}}}}}}},
     "response_format", "cannot enforce: /properties/a/dependentSchemas"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format must be an object of type"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "give one output constraint"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_regex": "[a-"}, "guided_regex", "the regex does not compile"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "constrains the output already"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools", "function.name"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs", "structured_outputs.xml is not supported"),
])
def test_bad_constraints_are_400s_naming_them(served, body, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=4, extra_body=body)
    assert message in e.value.body["message"] and e.value.body["param"] == param, e.value.body


def test_a_schema_past_the_limits_is_a_400_within_2_s_while_other_streams_flow(served):
    """Timed up to three times, each with a schema of its own (a refusal is remembered): one try
    stretched by a pause of a shared machine is noise, every try over 2 s is the finding."""
    gaps, done = [], threading.Event()

    def stream():
        last = None
        for chunk in served.loose.completions.create(model="tiny", prompt="x", max_tokens=2000, temperature=1.0,
                                                      stream=True, extra_body={"ignore_eos": True}):
            now = time.perf_counter()
            if last is not None:
                gaps.append((now, now - last))
            last = now
        done.set()

    runner = threading.Thread(target=stream)
    runner.start()
    while len(gaps) < 50 and runner.is_alive():
        time.sleep(0.01)
    tries = []
    for attempt in range(3):
        schema = {"title": f"try {attempt}", **deep_schema(8)}
        t0 = time.perf_counter()
        with pytest.raises(openai.BadRequestError, match="schema too large"):
            chat(served, response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}})
        tries.append((t0, time.perf_counter()))
        if tries[-1][1] - t0 < 2.0:
            break
    runner.join(60)
    t0, t1 = tries[-1]
    assert t1 - t0 < 2.0, [round(b - a, 2) for a, b in tries]
    before = sorted(g for at, g in gaps if at < tries[0][0])
    during = [g for at, g in gaps if t0 <= at <= t1 + 0.05]
    median = before[len(before) // 2]
    assert during and max(during) < max(10 * median, 0.25), (median, during)


def test_grpc_carries_the_same_constraints_and_tool_calls(served):
    import grpc

    from meshserve.serving.client import Client
    from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb

    with Client(f"127.0.0.1:{served.port}", token=TOKEN) as c:
        def run(**kw):
            responses = list(c.generate(max_tokens=1200, temperature=1.0, seed=2, **kw))
            return "".join(r.text for r in responses), responses[-1]

        text, last = run(text="x", json_schema=PERSON_SCHEMA)
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
        assert last.finish_reason == pb.FINISH_REASON_STOP
        assert run(text="x", choice=CHOICES)[0] in CHOICES
        messages = [{"role": "user", "content": "weather?"}]
        text, last = run(messages=messages, tools=[WEATHER, TIME], tool_choice="get_weather")
        assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS and len(last.tool_calls) == 1
        assert last.tool_calls[0].name == "get_weather" and last.tool_calls[0].arguments == text
        jsonschema.validate(json.loads(text), WEATHER["function"]["parameters"])
        for kw, message in [(dict(text="x", regex="[a-"), "the regex does not compile"),
                            (dict(messages=messages, tools=[WEATHER], tool_choice="nope"), "no tool is named 'nope'"),
                            (dict(text="x", json_schema={"oneOf": [{"type": "string"},
                                                                   {"type": "string", "maxLength": 3}]}),
                             "cannot enforce: /oneOf")]:
            with pytest.raises(grpc.RpcError) as e:
                run(**kw)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()

