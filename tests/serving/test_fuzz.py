"""Both APIs fuzzed. gRPC Generate over every field of its request message (and over raw bytes):
every answer is OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, the server stays SERVING. The HTTP API
over JSON bodies, headers and encodings: 2xx or 4xx in the OpenAI envelope, never a 5xx, and a
bystander's streams undisturbed. Afterwards every KV page is free. Seeded and bounded by time: a
few hundred examples each, a minute or two on a 2-core CPU."""

import json
import time

import grpc
from hypothesis import HealthCheck, given, seed, settings, strategies as st

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.serving.client import Client
from meshserve.serving.config import ServerConfig
from meshserve.serving.preprocess import ROLES
from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb
from meshserve.serving.server import ServerThread
from tests.serving.test_server import pool_is_free

CONFIG = EngineConfig(page_size=8, kv_cache_bytes=2**20, max_seq_len=64, max_num_seqs=8, max_num_batched_tokens=64,
                      max_prefill_chunk=32, max_queue_size=64, prefill_buckets=(32,), decode_buckets=(8,),
                      context_buckets=(8,))
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CALL_TIMEOUT_S = 60  # far more than any request here needs: running into it means a hang
END = {"at": None}  # the whole fuzz run stops making requests after two minutes

int32 = st.integers(-2**31, 2**31 - 1)
int64 = st.integers(-2**63, 2**63 - 1)
floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, 0.5, 1.0, 1.3, 2.0, -1.0]))
text = st.text(max_size=30)
sampling = st.fixed_dictionaries({}, optional={
    "temperature": floats, "top_k": st.one_of(int32, st.integers(0, 50)), "top_p": floats, "min_p": floats,
    "repetition_penalty": floats, "presence_penalty": floats, "frequency_penalty": floats,
    "seed": int64, "max_tokens": st.one_of(int32, st.integers(-1, 70)),
    "stop": st.lists(text, max_size=20), "stop_token_ids": st.lists(st.one_of(int32, st.integers(0, 300)), max_size=300),
    "logprobs": st.one_of(int32, st.integers(-1, 22)), "ignore_eos": st.booleans()})
messages = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES + ("", "wizard")), text),
                                           "content": text}), max_size=3)
requests = st.fixed_dictionaries({}, optional={
    "text": text, "token_ids": st.lists(st.one_of(st.integers(0, 300), int32), max_size=70),
    "messages": messages, "priority": st.one_of(int32, st.integers(0, 4)), "request_id": text,
    "sampling": sampling})


def _message(fields: dict) -> pb.GenerateRequest:
    fields = dict(fields)
    fields["messages"] = [pb.ChatMessage(**m) for m in fields.get("messages", [])]
    fields["sampling"] = pb.SamplingOptions(**fields.get("sampling", {}))
    return pb.GenerateRequest(**fields)


def _status(call) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_generate_survives_any_request(tiny_ckpt):
    server = ServerConfig(port=0, metrics_port=None, max_message_bytes=64 * 1024)
    with ServerThread(server, lambda: Engine(tiny_ckpt, CONFIG)) as s:
        s.wait_ready()
        engine = s.server.loop.engine
        ch = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        generate = ch.unary_stream("/meshserve.v1.Generation/Generate", request_serializer=lambda b: b,
                                   response_deserializer=pb.GenerateResponse.FromString)
        seen = {}
        END["at"] = time.monotonic() + 120

        def check(raw: bytes):
            if time.monotonic() > END["at"]:
                return
            code = _status(generate(raw, timeout=CALL_TIMEOUT_S))
            seen[code] = seen.get(code, 0) + 1
            assert code in ALLOWED, code

        @seed(20261127)
        @settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(requests)
        def messages_(fields):
            check(_message(fields).SerializeToString())

        @seed(20261128)
        @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.binary(max_size=200))
        def raw_bytes(raw):  # whatever a client may send: broken UTF-8, wrong wire types, truncation
            check(raw)

        messages_()
        raw_bytes()
        ch.close()
        assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= set(seen), seen
        with Client(f"127.0.0.1:{s.port}") as c:
            assert c.health() == "SERVING"
        assert pool_is_free(engine)


# ---- the HTTP API ------------------------------------------------------------------------------------

TOKEN = "fuzz-token"
HTTP_END = {"at": None}  # the HTTP fuzz run stops making requests after a minute
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([10**400, -10**400, 2**31]),
                   st.floats(), st.text(max_size=12))
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=6)
small = st.one_of(st.integers(-2, 40), value)
unit = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0]), value)
token_list = st.lists(st.one_of(st.integers(0, 300), st.integers(-2**40, 2**40)), max_size=40)
prompt = st.one_of(st.text(max_size=60), token_list, st.lists(st.text(max_size=20), max_size=3),
                   st.lists(token_list, max_size=3), value)
options = {"max_tokens": small, "temperature": unit, "top_p": unit, "top_k": small, "min_p": unit, "n": small,
           "stream": st.one_of(st.booleans(), value), "seed": small, "presence_penalty": unit,
           "frequency_penalty": unit, "repetition_penalty": unit, "stop": st.one_of(st.text(max_size=5), value),
           "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["5", "300", "-1", "x"]), unit, max_size=3), value),
           "ignore_eos": st.one_of(st.booleans(), value), "min_tokens": small, "priority": small, "user": value,
           "stream_options": st.one_of(st.just({"include_usage": True}), value),
           "model": st.sampled_from(["tiny", "x"])}
completion = st.fixed_dictionaries({"prompt": prompt}, optional={
    **options, "echo": st.one_of(st.booleans(), value), "logprobs": small, "suffix": value, "best_of": small})
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), value),
                                 "content": st.one_of(st.text(max_size=40), value)})
chat = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), value)}, optional={
    **options, "logprobs": st.one_of(st.booleans(), value), "top_logprobs": small, "max_completion_tokens": small,
    "response_format": value, "tools": value})
bodies = st.one_of(
    st.tuples(st.just("/v1/completions"), completion), st.tuples(st.just("/v1/chat/completions"), chat),
    st.tuples(st.just("/tokenize"), st.fixed_dictionaries({}, optional={"prompt": prompt, "messages": value,
                                                                        "add_special_tokens": value})),
    st.tuples(st.just("/detokenize"), st.fixed_dictionaries({}, optional={"tokens": st.one_of(token_list, value)})),
    st.tuples(st.sampled_from(["/v1/models", "/health", "/nowhere", "/v1/completions/../x"]), value))
encodings = st.sampled_from(["utf-8", "utf-16", "latin-1", "gzip", "gzip-claimed", "deflate-claimed", "br-claimed",
                             "raw"])
auths = st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}", "Bearer wrong", b"Bearer t\xf6k", "Basic abc", "", None])
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8",
                                 "application/json; charset=nope", "text/plain", "application/json; charset=utf-16",
                                 None])


def _http(port: int, method: str, path: str, body: bytes, headers: dict) -> tuple[int, bytes, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, val in headers.items():
            conn.putheader(name, val)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


def _encode(body, encoding: str, raw: bytes) -> tuple[bytes, dict]:
    import gzip

    text = json.dumps(body)
    if encoding == "raw":
        return raw, {}
    if encoding in ("utf-16", "latin-1"):
        return text.encode(encoding, "replace"), {}
    data = text.encode("utf-8", "surrogatepass")
    if encoding == "gzip":
        return gzip.compress(data), {"Content-Encoding": "gzip"}
    if encoding.endswith("-claimed"):  # says compressed, is not
        return data, {"Content-Encoding": encoding.split("-")[0]}
    return data, {}


def test_the_http_api_survives_any_request(tiny_ckpt):
    """Bodies, headers and encodings fuzzed against the HTTP API while a bystander streams: every
    answer is 2xx or 4xx (4xx in the OpenAI envelope), never a 5xx; the bystander's greedy streams
    come out whole and identical; the server is healthy and every page free afterwards."""
    import threading

    import openai

    # a body claiming a compression it lacks can leave aiohttp waiting for more: the body timeout
    # (408) ends it; 3 s here, where every real body arrives at once
    server = ServerConfig(port=0, http_port=0, metrics_port=None, auth_tokens=(TOKEN,), max_message_bytes=64 * 1024,
                          http_body_timeout_s=3.0)
    with ServerThread(server, lambda: Engine(tiny_ckpt, CONFIG)) as s:
        s.wait_ready()
        port, engine = s.server.http.port, s.server.loop.engine
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=60)

        def bystander() -> str:
            stream = client.completions.create(model="tiny", prompt="a bystander", max_tokens=24, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in stream if c.choices)

        want, texts, faults, done = bystander(), [], [], threading.Event()

        def watch():
            while not done.is_set():
                try:
                    texts.append(bystander())
                except Exception as e:  # an overloaded queue would be a 429: none is expected here
                    faults.append(repr(e))

        watcher = threading.Thread(target=watch)
        watcher.start()
        statuses = {}
        HTTP_END["at"] = time.monotonic() + 60

        @seed(20261206)
        @settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(bodies, encodings, st.binary(max_size=60), auths, content_types)
        def requests_(call, encoding, raw, auth, content_type):
            if time.monotonic() > HTTP_END["at"]:
                return
            path, body = call
            data, headers = _encode(body, encoding, raw)
            if auth is not None:
                headers["Authorization"] = auth
            if content_type is not None:
                headers["Content-Type"] = content_type
            method = "GET" if path in ("/v1/models", "/health") else "POST"
            status, answer, kind = _http(port, method, path, data, headers)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (status, answer[:300], path, body, headers)
            if status >= 400:
                error = json.loads(answer)["error"]
                assert "application/json" in kind and set(error) == {"message", "type", "param", "code"}, answer

        try:
            requests_()
        finally:
            done.set()
            watcher.join(timeout=120)
        assert {200, 400, 401} <= set(statuses), statuses
        assert not faults and len(texts) >= 3 and all(t == want for t in texts), (faults, len(texts))
        assert _http(port, "GET", "/health", b"", {})[0] == 200
        assert pool_is_free(engine)
