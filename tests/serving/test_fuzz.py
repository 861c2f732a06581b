"""Generate, fuzzed over every field of its request message (and over raw bytes): every answer is
OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, the server stays SERVING, and afterwards every KV page
is free. Seeded and bounded: a few hundred examples, about a minute on a 2-core CPU."""

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
