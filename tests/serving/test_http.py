"""The OpenAI-compatible HTTP API on loopback, driven by the real `openai` client (strict response
validation) and by raw HTTP for what the client hides: SSE framing, error envelopes, statuses."""

import concurrent.futures
import dataclasses
import json
import random
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingParams
from meshserve.serving.client import Client
from meshserve.serving.config import ServerConfig
from meshserve.serving.server import ServerThread
from tests.serving.test_server import pool_is_free

TOKEN = "http-token"
CONFIG = EngineConfig(page_size=8, kv_cache_bytes=2**20, max_seq_len=64, max_num_seqs=16, max_num_batched_tokens=128,
                      max_prefill_chunk=32, max_queue_size=256, prefill_buckets=(32,), decode_buckets=(4, 16),
                      context_buckets=(8,))
SERVER = ServerConfig(port=0, metrics_port=None, http_port=0, auth_tokens=(TOKEN,), max_message_bytes=64 * 1024)
PROMPTS = ["the theory", "in an inn", "hello there", "abc abc abc"]


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    with ServerThread(SERVER, lambda: Engine(tiny_ckpt, CONFIG)) as s:
        s.wait_ready()
        s.engine = s.server.loop.engine
        s.base = f"http://127.0.0.1:{s.server.http.port}"
        yield s


def client(served, token=TOKEN, strict=True, **kw) -> openai.OpenAI:
    """The client validating every response against its types, except where the SDK's own types
    cannot hold OpenAI's wire format: completion stream chunks carry `finish_reason: null`, and echoed
    logprobs start with null (the first prompt token), neither of which its Completion types allow."""
    return openai.OpenAI(base_url=served.base + "/v1", api_key=token, _strict_response_validation=strict, **kw)


def post(base, path, body, token=TOKEN, raw: bytes | None = None):
    """(status, headers, body text) of a raw POST to the server at `base` (or a served fixture's)."""
    base = getattr(base, "base", base)
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def get(served, path, token=TOKEN):
    req = urllib.request.Request(served.base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---- the openai client ------------------------------------------------------------------------------


def test_greedy_text_equals_grpc_and_the_offline_engine(served, tiny_ckpt):
    offline = Engine(tiny_ckpt, CONFIG).generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    c = client(served)
    http = c.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True})
    assert [ch.text for ch in sorted(http.choices, key=lambda ch: ch.index)] == [o.text for o in offline]
    assert http.usage.completion_tokens == 48
    with Client(f"127.0.0.1:{served.port}", token=TOKEN) as g:
        grpc_texts = ["".join(r.text for r in g.generate(text=p, max_tokens=12, ignore_eos=True)) for p in PROMPTS]
    assert grpc_texts == [o.text for o in offline]
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                     temperature=0, extra_body={"ignore_eos": True})
    ids = tiny_ckpt.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == Engine(tiny_ckpt, CONFIG).generate(
        [ids], SamplingParams(max_tokens=8, ignore_eos=True))[0].text
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == len(ids)


def test_streams_carry_the_same_text_and_usage_last(served):
    c, loose = client(served), client(served, strict=False)
    whole = c.completions.create(model="tiny", prompt="the theory", max_tokens=10, temperature=0)
    chunks = list(loose.completions.create(model="tiny", prompt="the theory", max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    chat = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-2].choices[0].finish_reason in ("stop", "length") and chat[-1].usage.completion_tokens >= 1
    continuous = list(loose.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, stream=True,
                                           stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(ch.usage is not None for ch in continuous)


def test_logprobs_n_stop_and_seeds(served, tiny_ckpt):
    c = client(served)
    r = c.completions.create(model="tiny", prompt="hello there", max_tokens=5, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(max(top.values()) == pytest.approx(tok) for tok, top in zip(lp.token_logprobs, lp.top_logprobs))
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    sampled = dict(model="tiny", prompt="in an inn", max_tokens=8, temperature=1.0, seed=7, n=3,
                   extra_body={"ignore_eos": True})
    first, again = c.completions.create(**sampled), c.completions.create(**sampled)
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    assert texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]  # reproducible
    assert len(set(texts)) == 3 and first.usage.prompt_tokens == len(tiny_ckpt.tokenizer.encode("in an inn"))
    full = c.completions.create(model="tiny", prompt="the theory", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model="tiny", prompt="the theory", max_tokens=12, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_echo_scores_the_prompt(served, tiny_ckpt):
    c = client(served, strict=False)
    ids = tiny_ckpt.tokenizer.encode("the theory of everything")
    scored = c.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = scored.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    only = c.completions.create(model="tiny", prompt=ids, max_tokens=0, logprobs=1, echo=True).choices[0]
    assert only.logprobs.token_logprobs == lp.token_logprobs[:-1] and only.text == "the theory of everything"


def test_errors_reach_the_client_as_its_exceptions(served):
    c = client(served, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=5, top_p=3.0)
    assert e.value.body["param"] == "top_p" and "top_p" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                  tools=[{"type": "function", "function": {"name": "", "parameters": {}}}])
    assert e.value.body["param"] == "tools" and "tools[0].function.name" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        client(served, token="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="x")
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_a_full_queue_is_retried_by_the_client(tiny_ckpt):
    """429 with Retry-After while the queue is full; the client's own retry then gets through."""
    config = dataclasses.replace(CONFIG, max_num_seqs=1, max_queue_size=1, decode_buckets=(1,))
    with ServerThread(SERVER, lambda: Engine(tiny_ckpt, config)) as s:
        s.wait_ready()
        engine = s.server.loop.engine
        hog = engine.kv.blocks.grow([], engine.kv.num_free * config.page_size)  # nothing can run …
        assert hog is not None
        base = f"http://127.0.0.1:{s.server.http.port}"
        c = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=5, _strict_response_validation=True)
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            queued = ex.submit(c.completions.create, model="tiny", prompt="a", max_tokens=2, temperature=0)
            while not engine.scheduler.waiting:
                time.sleep(0.01)
            threading.Timer(1.5, lambda: engine.kv.blocks.release(hog)).start()  # … until the pages come back
            t0 = time.monotonic()
            retried = c.completions.create(model="tiny", prompt="b", max_tokens=2, temperature=0)
            assert retried.choices[0].finish_reason in ("stop", "length") and time.monotonic() - t0 >= 1.0
            assert queued.result(timeout=30).choices
        rejected = [line for line in _metrics(base).splitlines() if 'outcome="rejected"' in line]
        assert float(rejected[0].split()[-1]) >= 1


def _metrics(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        return r.read().decode()


# ---- raw HTTP ---------------------------------------------------------------------------------------


def test_sse_framing(served):
    status, headers, body = post(served, "/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 3,
                                                             "temperature": 0, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"


BAD = {
    "empty prompt": ({"prompt": "", "max_tokens": 2}, 400, "prompt"),
    "prompt of the wrong type": ({"prompt": 5}, 400, "prompt"),
    "max_tokens a string": ({"prompt": "a", "max_tokens": "10"}, 400, "max_tokens"),
    "negative max_tokens": ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    "temperature < 0": ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    "presence_penalty > 2": ({"prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    "logprobs > 20": ({"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    "n = 0": ({"prompt": "a", "n": 0}, 400, "n"),
    "n with best_of": ({"prompt": "a", "n": 2, "best_of": 3}, 400, "best_of"),
    "suffix": ({"prompt": "a", "suffix": "z"}, 400, "suffix"),
    "token outside the vocabulary": ({"prompt": [1, 10**6]}, 400, "prompt"),
    "prompt + max_tokens over the context": ({"prompt": [1] * 40, "max_tokens": 40}, 400, "max_tokens"),
    "logit_bias not a token": ({"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    "stream_options without stream": ({"prompt": "a", "stream_options": {"include_usage": True}}, 400,
                                      "stream_options"),
    "unknown model": ({"prompt": "a", "model": "nope"}, 404, "model"),
    "oversize body": ({"prompt": "a" * 70_000}, 413, None),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_get_their_status_and_envelope(served, name):
    body, status, param = BAD[name]
    got, headers, text = post(served, "/v1/completions", {"model": "tiny", **body})
    assert got == status, (name, text)
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and (error["code"] is None or isinstance(error["code"], str))


def test_malformed_json_auth_and_unknown_fields(served):
    status, _, text = post(served, "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    status, _, text = post(served, "/v1/completions", {"prompt": "a"}, token=None)
    assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
    status, _, text = post(served, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and "role" in json.loads(text)["error"]["message"]
    status, _, text = post(served, "/v1/completions", {"prompt": "a", "max_tokens": 2, "frobnicate": 1})
    assert status == 200  # unknown fields are ignored


def _requests_total(served) -> float:
    body = get(served, "/metrics", token=None)[1]
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith("meshserve_requests_total{"))


def test_every_generation_call_is_counted_once(served):
    before = _requests_total(served)
    client(served).completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=2)  # 4 choices, 1 call
    post(served, "/v1/completions", {"prompt": "a", "top_p": 9})
    post(served, "/v1/completions", {"prompt": "a"}, token="wrong")
    assert _requests_total(served) == before + 3


def test_model_list_health_metrics_and_tokenizer_endpoints(served, tiny_ckpt):
    status, body = get(served, "/v1/models")
    model = json.loads(body)["data"][0]
    assert status == 200 and model["max_model_len"] == 64
    assert (model["dtype"], model["quantization"], model["kv_cache_dtype"]) == ("float32", None, "float32")
    assert get(served, "/health", token=None)[0] == 200
    status, body = get(served, "/metrics", token=None)
    assert status == 200 and "meshserve_requests_total" in body
    status, _, text = post(served, "/tokenize", {"prompt": "hello there", "add_special_tokens": False})
    ids = json.loads(text)["tokens"]
    assert status == 200 and ids == tiny_ckpt.tokenizer.encode("hello there")
    assert json.loads(post(served, "/detokenize", {"tokens": ids})[2])["prompt"] == "hello there"
    info = json.loads(get(served, "/tokenizer_info")[1])
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"]


def test_health_is_503_until_ready(tiny_ckpt):
    gate = threading.Event()

    def build():
        gate.wait(60)
        return Engine(tiny_ckpt, CONFIG)

    with ServerThread(SERVER, build) as s:
        base = f"http://127.0.0.1:{s.server.http.port}"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/health", timeout=10)
        assert e.value.code == 503
        status, headers, _ = post(base, "/v1/completions", {"prompt": "a"})
        assert status == 503 and headers.get("Retry-After")
        gate.set()
        s.wait_ready()
        assert urllib.request.urlopen(base + "/health", timeout=10).status == 200


def test_200_cut_streams_free_every_page(served):
    rng = random.Random(0)

    def one(i):
        c = client(served, strict=False)
        with c.completions.with_streaming_response.create(model="tiny", prompt=PROMPTS[i % 4], max_tokens=40,
                                                          temperature=0, stream=True,
                                                          extra_body={"ignore_eos": True}) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n >= rng.randint(0, 6):
                    break  # leaving the block closes the connection mid-stream

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(one, range(200)))
    assert pool_is_free(served.engine)
    with Client(f"127.0.0.1:{served.port}", token=TOKEN) as g:
        assert g.health() == "SERVING"


def test_a_client_gone_before_the_answer_aborts_the_request(served):
    import socket

    body = json.dumps({"model": "tiny", "prompt": [3, 4], "max_tokens": 60, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", served.server.http.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        while not served.engine.has_unfinished:
            time.sleep(0.001)
    assert pool_is_free(served.engine, timeout=5)


def test_echoed_logprobs_for_every_choice_and_odd_bodies(served):
    status, _, text = post(served, "/v1/completions", {"prompt": "abc", "echo": True, "logprobs": 1, "max_tokens": 1,
                                                       "n": 2, "temperature": 1.0, "seed": 3})
    choices = json.loads(text)["choices"]
    assert status == 200 and len(choices) == 2
    for c in choices:  # each choice scores the prompt (forks take the first's scores)
        assert c["logprobs"]["token_logprobs"][0] is None and len(c["logprobs"]["token_logprobs"]) == 4
    assert choices[0]["logprobs"]["token_logprobs"][:3] == choices[1]["logprobs"]["token_logprobs"][:3]
    status, _, text = post(served, "/v1/completions", None, raw=b"[" * 100_000 + b"]" * 100_000)
    assert status in (400, 413) and "error" in json.loads(text)
    status, _, text = post(served, "/tokenize", {"prompt": "\ud800"})
    assert status == 400 and json.loads(text)["error"]["message"].startswith("text is not valid Unicode")
