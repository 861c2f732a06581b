"""The gRPC server on loopback, with the tiny random model: streams, cancellation, bad requests,
health, reflection, metrics, admission control and shutdown."""

import concurrent.futures
import dataclasses
import random
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingParams
from meshserve.serving.client import Client, channel
from meshserve.serving.config import ServerConfig
from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb
from meshserve.serving.server import ServerThread

TOKEN = "s3cret-token"
CONFIG = EngineConfig(page_size=8, kv_cache_bytes=2**20, max_seq_len=64, max_num_seqs=64,
                      max_num_batched_tokens=256, max_prefill_chunk=32, max_queue_size=1024,
                      prefill_buckets=(32,), decode_buckets=(16, 64), context_buckets=(8,))
SERVER = ServerConfig(port=0, metrics_port=0, auth_tokens=(TOKEN,), max_message_bytes=64 * 1024)


def prompt_text(i: int) -> str:
    return f"request {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3)


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    gate = threading.Event()
    engines = []

    def build():
        gate.wait(60)
        engine = Engine(tiny_ckpt, CONFIG)
        engines.append(engine)
        return engine

    with ServerThread(SERVER, build) as s:
        with Client(f"127.0.0.1:{s.port}", token=TOKEN) as c:
            s.health_before = c.health()  # while the engine is still "compiling"
            try:
                c.model_info()
            except grpc.RpcError as e:
                s.early_code = e.code()
            gate.set()
            s.wait_ready()
            s.health_after = c.health()
        s.engine = engines[0]
        yield s


@pytest.fixture(scope="module")
def offline(tiny_ckpt):
    """Greedy text of every prompt from the offline engine."""
    engine = Engine(tiny_ckpt, CONFIG)
    out = engine.generate([prompt_text(i) for i in range(64)], SamplingParams(max_tokens=16, ignore_eos=True))
    return [c.text for c in out], [list(c.token_ids) for c in out]


def client(served) -> Client:
    return Client(f"127.0.0.1:{served.port}", token=TOKEN)


def pool_is_free(engine: Engine, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.kv.num_free == engine.kv.num_usable and not engine.has_unfinished:
            return True
        time.sleep(0.05)
    return False


def test_health_before_and_after_warm_up(served):
    assert served.health_before == "NOT_SERVING"
    assert served.early_code == grpc.StatusCode.UNAVAILABLE
    assert served.health_after == "SERVING"


def test_64_concurrent_streams_equal_the_offline_engine(served, offline):
    texts, tokens = offline

    def one(i):
        with client(served) as c:
            parts, ids, last = [], [], None
            for resp in c.generate(text=prompt_text(i), max_tokens=16, ignore_eos=True, timeout=120):
                parts.append(resp.text)
                ids.extend(resp.token_ids)
                last = resp
            return "".join(parts), ids, last

    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        results = list(ex.map(one, range(64)))
    for i, (text, ids, last) in enumerate(results):
        assert ids == tokens[i] and text == texts[i], i
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 16 and last.usage.prompt_tokens > 0
        assert last.usage.time_to_first_token_s > 0
    assert pool_is_free(served.engine)


def test_500_random_cancellations_free_every_page(served, offline):
    rng = random.Random(0)

    def one(i):
        with client(served) as c:
            call = c.generate(text=prompt_text(i % 64), max_tokens=rng.randint(4, 24), ignore_eos=True)
            stop_after = rng.randint(0, 6)
            try:
                if stop_after == 0:
                    time.sleep(rng.random() * 0.01)
                else:
                    for n, _ in enumerate(call, 1):
                        if n >= stop_after:
                            break
            finally:
                call.cancel()

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        list(ex.map(one, range(500)))
    assert pool_is_free(served.engine), served.engine.stats()
    with client(served) as c:  # and it keeps serving, correctly
        ids = [t for r in c.generate(text=prompt_text(3), max_tokens=16, ignore_eos=True) for t in r.token_ids]
    assert ids == offline[1][3]


def _code(served, token=TOKEN, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    with Client(f"127.0.0.1:{served.port}", token=token) as c:
        try:
            list(c.generate(timeout=30, **kwargs))
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REQUESTS = {
    "empty input": (dict(), INVALID, "set exactly one of text, token_ids, messages"),
    "text and tokens": (dict(text="hi", token_ids=[1, 2]), INVALID, "got text and token_ids"),
    "oversize prompt": (dict(token_ids=[5] * 80), INVALID, "does not fit the context"),
    "token outside the vocabulary": (dict(token_ids=[5, 10**6]), INVALID, "outside the vocabulary"),
    "temperature < 0": (dict(text="hi", temperature=-1.0), INVALID, "temperature"),
    "top_p = 0": (dict(text="hi", top_p=0.0), INVALID, "top_p"),
    "top_p > 1": (dict(text="hi", top_p=1.5), INVALID, "top_p"),
    "top_k < 0": (dict(text="hi", top_k=-1), INVALID, "top_k"),
    "min_p > 1": (dict(text="hi", min_p=2.0), INVALID, "min_p"),
    "repetition_penalty = 0": (dict(text="hi", repetition_penalty=0.0), INVALID, "repetition_penalty"),
    "presence_penalty > 2": (dict(text="hi", presence_penalty=3.0), INVALID, "presence_penalty"),
    "frequency_penalty < -2": (dict(text="hi", frequency_penalty=-3.0), INVALID, "frequency_penalty"),
    "seed < 0": (dict(text="hi", seed=-1), INVALID, "seed"),
    "logprobs > 20": (dict(text="hi", logprobs=21), INVALID, "logprobs"),
    "stop token outside the vocabulary": (dict(text="hi", stop_token_ids=[10**6]), INVALID, "stop"),
    "max_tokens = 0": (dict(text="hi", max_tokens=0), INVALID, "max_tokens"),
    "max_tokens past the context": (dict(text="hi", max_tokens=100), INVALID, "max_tokens"),
    "priority out of range": (dict(text="hi", priority=7), INVALID, "priority"),
    "oversize request id": (dict(text="hi", request_id="x" * 300), INVALID, "request_id"),
    "empty chat role": (dict(messages=[{"role": "", "content": "x"}]), INVALID, "messages[0].role"),
    "unknown chat role": (dict(messages=[{"role": "wizard", "content": "x"}]), INVALID,
                          "messages[0].role must be one of system, developer, user, assistant, tool"),
    "temperature = inf": (dict(text="hi", temperature=float("inf")), INVALID, "temperature must be a finite number"),
    "repetition_penalty = inf": (dict(text="hi", repetition_penalty=float("inf")), INVALID,
                                 "repetition_penalty must be a finite number"),
    "10,000 stop strings": (dict(text="hi", stop=[chr(65 + i % 26) for i in range(10_000)]), INVALID,
                            "stop: 10000 stop strings, at most 16 allowed"),
    "a 2,000-character stop string": (dict(text="hi", stop=["x" * 2000]), INVALID, "at most 1024"),
    "1,000 stop token ids": (dict(text="hi", stop_token_ids=[5] * 1000), INVALID, "at most 256 allowed"),
    "oversize message": (dict(text="x" * 100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    "wrong auth token": (dict(text="hi", token="nope"), grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
    "no auth token": (dict(text="hi", token=None), grpc.StatusCode.UNAUTHENTICATED, "bearer token"),
}


def test_bad_requests_get_their_status_and_the_server_stays_healthy(served):
    for name, (kwargs, code, words) in BAD_REQUESTS.items():
        token = kwargs.pop("token", TOKEN)
        got, details = _code(served, token=token, **kwargs)
        kwargs["token"] = token
        assert got == code, (name, got, details)
        assert words in details, (name, details)
    with client(served) as c:
        assert c.health() == "SERVING"
        assert len([r for r in c.generate(text="still fine", max_tokens=4, ignore_eos=True)]) >= 1
    assert pool_is_free(served.engine)


def test_invalid_utf8_is_invalid_argument(served):
    raw = pb.GenerateRequest(text="abc", sampling=pb.SamplingOptions(max_tokens=2)).SerializeToString()
    ch = channel(f"127.0.0.1:{served.port}", token=TOKEN)
    generate = ch.unary_stream("/meshserve.v1.Generation/Generate", request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        list(generate(raw.replace(b"abc", b"a\xffc"), timeout=10))
    assert e.value.code() == INVALID and "bad UTF-8" in e.value.details()
    assert len(list(generate(raw, timeout=10))) >= 1  # the same request, valid, is served
    ch.close()


def test_a_request_that_cannot_fit_is_refused_at_once_and_the_next_is_served(served, offline):
    t0 = time.monotonic()
    code, details = _code(served, token_ids=[5] * 40, max_tokens=40)  # 80 tokens > the 64-token context
    assert code == INVALID and "exceeds the context of 64 tokens" in details
    assert time.monotonic() - t0 < 1.0
    with client(served) as c:
        ids = [t for r in c.generate(text=prompt_text(5), max_tokens=16, ignore_eos=True, timeout=30)
               for t in r.token_ids]
    assert ids == offline[1][5]


def test_a_fault_while_delivering_one_output_ends_that_stream_only(served, offline):
    metrics = served.server.metrics
    real, failed = metrics.ttft.observe, []

    def observe(value):
        if not failed:
            failed.append(value)
            raise RuntimeError("injected fault while delivering")
        real(value)

    metrics.ttft.observe = observe
    try:
        def one(i):
            try:
                with client(served) as c:
                    return [t for r in c.generate(text=prompt_text(i), max_tokens=16, ignore_eos=True, timeout=60)
                            for t in r.token_ids]
            except grpc.RpcError as e:
                return e.code()

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            results = list(ex.map(one, range(4)))
    finally:
        del metrics.ttft.observe
    assert results.count(grpc.StatusCode.INTERNAL) == 1
    assert all(r == offline[1][i] for i, r in enumerate(results) if r != grpc.StatusCode.INTERNAL)
    assert pool_is_free(served.engine)


def test_internal_error_fails_that_request_only(served, offline):
    engine = served.engine
    real = engine.outputs._next

    def faulty(req, *args):
        if req.seq.request_id == "boom":
            raise RuntimeError("injected fault")
        return real(req, *args)

    engine.outputs._next = faulty
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            bad = ex.submit(_code, served, text=prompt_text(1), max_tokens=16, request_id="boom")
            good = ex.submit(lambda: [t for r in client(served).generate(
                text=prompt_text(2), max_tokens=16, ignore_eos=True) for t in r.token_ids])
            code, details = bad.result()
            assert code == grpc.StatusCode.INTERNAL and "injected fault" in details
            assert good.result() == offline[1][2]
    finally:
        del engine.outputs._next
    assert pool_is_free(engine)


def test_tokenize_detokenize_model_info(served, tiny_ckpt):
    with client(served) as c:
        ids = c.tokenize("hello world")
        assert ids == tiny_ckpt.tokenizer.encode("hello world")
        assert c.detokenize(ids) == "hello world"
        chat = c.tokenize(messages=[{"role": "user", "content": "hi"}])
        assert chat == tiny_ckpt.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
        info = c.model_info()
        assert (info.name, info.vocab_size, info.context_length, info.dtype) == ("tiny", 300, 64, "float32")
        assert info.mesh == "data=1 × tensor=1"
        with pytest.raises(grpc.RpcError) as e:
            c.detokenize([10**6])
        assert e.value.code() == INVALID


def test_logprobs_stream(served):
    with client(served) as c:
        resps = list(c.generate(text="abc", max_tokens=3, ignore_eos=True, logprobs=2))
    lps = [lp for r in resps for lp in r.logprobs]
    assert len(lps) == 3 and all(len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob for lp in lps)


def test_reflection_lists_the_service(served):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    ch = channel(f"127.0.0.1:{served.port}", token=TOKEN)
    services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "meshserve.v1.Generation" in services and "grpc.health.v1.Health" in services
    ch.close()


def test_health_needs_no_token(served):
    ch = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="meshserve.v1.Generation"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    ch.close()


def test_metrics_endpoint_has_every_series(served):
    from meshserve.serving.metrics import Metrics

    with client(served) as c:  # one of each outcome this test counts
        list(c.generate(text="x", max_tokens=2, ignore_eos=True))
        call = c.generate(text="y", max_tokens=30, ignore_eos=True)
        next(call)
        call.cancel()
    _code(served, text="hi", temperature=-1.0)
    _code(served, text="hi", token="nope")
    assert pool_is_free(served.engine)
    body = urllib.request.urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics", timeout=10).read().decode()
    for series in Metrics.SERIES:
        assert f"\n{series}" in body or f"\n{series}_" in body, series
    counted = _outcomes(served)
    for outcome in ("length", "abort", "invalid", "unauthenticated"):
        assert counted[outcome] >= 1, outcome


def _outcomes(served) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics", timeout=10).read().decode()
    return {line.split('"')[1]: float(line.split()[1]) for line in body.splitlines()
            if line.startswith("meshserve_requests_total{")}


def test_every_request_is_counted_even_one_cancelled_before_the_engine_saw_it(served, tiny_ckpt, monkeypatch):
    real = tiny_ckpt.tokenizer.encode
    tokenizing = threading.Event()

    def slow(text, add_bos=None):
        tokenizing.set()
        time.sleep(0.5)
        return real(text, add_bos)

    before = _outcomes(served)
    monkeypatch.setattr(tiny_ckpt.tokenizer, "encode", slow)
    with client(served) as c:
        call = c.generate(text="never reaches the engine", max_tokens=4)
        assert tokenizing.wait(10)
        call.cancel()
        with pytest.raises(grpc.RpcError):
            list(call)
    time.sleep(1.0)
    monkeypatch.undo()
    with Client(f"127.0.0.1:{served.port}", token="nope") as c, pytest.raises(grpc.RpcError):
        c.tokenize("not a Generate call: not counted")
    after = _outcomes(served)
    assert after["abort"] == before["abort"] + 1
    assert sum(after.values()) == sum(before.values()) + 1


# ---- admission control, deadlines and shutdown, on a server that runs one request at a time -------


@pytest.fixture
def narrow(tiny_ckpt):
    config = dataclasses.replace(CONFIG, max_num_seqs=1, max_queue_size=2, decode_buckets=(1,))
    with ServerThread(dataclasses.replace(SERVER, auth_tokens=(), metrics_port=None),
                      lambda: Engine(tiny_ckpt, config)) as s:
        s.wait_ready()
        yield s


def _stream(port, **kwargs):
    with Client(f"127.0.0.1:{port}") as c:
        return list(c.generate(**kwargs))


def test_full_queue_is_resource_exhausted_and_deadlines_abort(narrow):
    engine = narrow.server.loop.engine
    long = dict(token_ids=[3, 4, 5], max_tokens=60, ignore_eos=True)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        first = ex.submit(_stream, narrow.port, **long)
        while not engine.scheduler.running:
            time.sleep(0.005)
        queued = [ex.submit(_stream, narrow.port, **long) for _ in range(2)]
        while len(engine.scheduler.waiting) < 2:
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as e:
            _stream(narrow.port, **long)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()
        first.result(), [q.result() for q in queued]
    # a deadline that passes while the request waits: the client gets DEADLINE_EXCEEDED, the engine
    # drops the request and its pages
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        busy = ex.submit(_stream, narrow.port, **long)
        while not engine.scheduler.running:
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as e:
            _stream(narrow.port, timeout=0.05, **long)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        busy.result()
    assert pool_is_free(engine)


def test_shutdown_drains_then_aborts(narrow):
    engine = narrow.server.loop.engine
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        running = ex.submit(_stream, narrow.port, token_ids=[3, 4, 5], max_tokens=60, ignore_eos=True)
        while not engine.scheduler.running:
            time.sleep(0.005)
        t0 = time.monotonic()
        narrow.shutdown(drain_timeout_s=0.0)
        resps = running.result(timeout=30)
    assert time.monotonic() - t0 < 10
    assert resps[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert pool_is_free(engine)
    with pytest.raises(grpc.RpcError) as e:  # no longer listening
        _stream(narrow.port, text="hi", max_tokens=2, timeout=2)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# ---- TLS ------------------------------------------------------------------------------------------


def test_tls(tiny_ckpt, tmp_path):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    config = dataclasses.replace(CONFIG, max_num_seqs=1, decode_buckets=(1,))
    tls = dataclasses.replace(SERVER, auth_tokens=(), metrics_port=None, tls_cert=str(cert), tls_key=str(key))
    with ServerThread(tls, lambda: Engine(tiny_ckpt, config)) as s:
        s.wait_ready()
        with Client(f"localhost:{s.port}", tls_ca=str(cert)) as c:
            assert c.health() == "SERVING"
            assert sum(len(r.token_ids) for r in c.generate(text="hi", max_tokens=3, ignore_eos=True)) == 3
        with Client(f"localhost:{s.port}") as c, pytest.raises(grpc.RpcError) as e:  # plaintext is refused
            c.health(timeout=3)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_usage_counts_prefix_cache_hits(served):
    prompt = list(range(40, 80))  # 40 tokens: 4 full pages of 8 may come from the cache
    with client(served) as c:
        first = list(c.generate(token_ids=prompt, max_tokens=2, ignore_eos=True))[-1]
        again = list(c.generate(token_ids=prompt, max_tokens=2, ignore_eos=True))[-1]
    assert first.usage.cached_tokens == 0 and again.usage.cached_tokens == 32
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == 40


def test_restart_on_the_same_store_is_a_store_hit(tiny_ckpt, tmp_path):
    """Serve, stop (cached pages are written to the store), start again: the prefix comes from it."""
    config = dataclasses.replace(CONFIG, max_num_seqs=1, decode_buckets=(1,), host_kv_bytes=2**20,
                                 kv_store=str(tmp_path / "kv"))
    server = dataclasses.replace(SERVER, auth_tokens=(), metrics_port=None)
    prompt = list(range(40, 80))
    usage = []
    for _ in range(2):
        with ServerThread(server, lambda: Engine(tiny_ckpt, config)) as s:
            s.wait_ready()
            usage.append(_stream(s.port, token_ids=prompt, max_tokens=2, ignore_eos=True)[-1].usage)
            engine = s.server.loop.engine
    assert usage[0].cached_tokens == 0 and usage[1].cached_tokens == 32
    assert engine.stats()["store_hit_pages"] == 4


def test_speculative_decoding_serves_the_same_tokens_and_is_counted(tiny_ckpt, offline):
    from meshserve.runtime.speculative import SpeculativeConfig

    import openai

    config = dataclasses.replace(CONFIG, speculative=SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1))
    with ServerThread(dataclasses.replace(SERVER, auth_tokens=(), http_port=0), lambda: Engine(tiny_ckpt, config)) as s:
        s.wait_ready()
        with Client(f"127.0.0.1:{s.port}") as c:
            for i in range(6):  # one at a time: under the batch-size cut-off
                text = "".join(r.text for r in c.generate(text=prompt_text(i), max_tokens=16, ignore_eos=True))
                assert text == offline[0][i]
            # a request's own draft length: within the server's 3, else INVALID_ARGUMENT naming the range
            for k in (0, 1):
                assert "".join(r.text for r in c.generate(text=prompt_text(0), max_tokens=16, ignore_eos=True,
                                                          num_speculative_tokens=k)) == offline[0][0]
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate(text="x", max_tokens=4, num_speculative_tokens=4))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "num_speculative_tokens must be in [0, 3]" in e.value.details()
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{s.server.http.port}/v1", api_key="none", max_retries=0)
        out = api.completions.create(model="tiny", prompt=prompt_text(1), max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True, "num_speculative_tokens": 2})
        assert out.choices[0].text == offline[0][1]
        with pytest.raises(openai.BadRequestError) as e:
            api.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"num_speculative_tokens": 9})
        assert e.value.body["param"] == "num_speculative_tokens" and "[0, 3]" in e.value.body["message"]
        body = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10).read().decode()
    counted = {line.split()[0]: float(line.split()[1]) for line in body.splitlines()
               if line.startswith("meshserve_spec_decode_num_")}
    assert counted["meshserve_spec_decode_num_drafts_total"] > 0
    assert counted["meshserve_spec_decode_num_draft_tokens_total"] >= counted["meshserve_spec_decode_num_drafts_total"]
    assert 'meshserve_spec_decode_num_accepted_tokens_per_pos_total{position="2"}' in counted
