"""Every outcome a call is counted under (meshserve_requests_total{outcome}), made to happen once
through each transport: gRPC and HTTP on one server, driven by their real clients, and the Dynamo
worker's handler on a process host of its own (called as Dynamo's request plane calls it; the
worker's path through Dynamo's real frontend is tests/serving/test_worker.py). Each call must be
counted exactly once, under the outcome named, and reach its client as that transport says it."""

import asyncio
import dataclasses
import threading
import time

import grpc
import openai
import pytest
from dynamo.llm.exceptions import InvalidArgument

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.request import RequestLimits
from meshserve.serving.client import Client
from meshserve.serving.config import ServerConfig
from meshserve.serving.engine_loop import EngineUnavailable, RequestFailed, RequestRejected
from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb
from meshserve.serving.server import ServerThread
from meshserve.serving.worker import Worker

TOKEN = "outcome-token"
VOCAB = 300  # tests/conftest.py's tiny model
FAULTY, SLOW = 7, 50  # max_tokens that make a request fail in its host work, or take ~2.5 s
CONFIG = EngineConfig(page_size=8, kv_cache_bytes=2**20, max_seq_len=64, max_num_seqs=4, max_num_batched_tokens=64,
                      max_prefill_chunk=32, prefill_buckets=(32,), decode_buckets=(4,), context_buckets=(8,),
                      queue_timeout_s=0.5, limits=RequestLimits(max_stop_token_ids=VOCAB))
SERVER = ServerConfig(port=0, http_port=0, metrics_port=None, auth_tokens=(TOKEN,))
OUTCOMES = ("stop", "length", "abort", "error", "rejected", "invalid", "unavailable", "unauthenticated")


def build(ckpt, gate: threading.Event) -> Engine:
    """The engine, once `gate` opens, with two faults of its own: a request asking for FAULTY
    tokens fails in its host work (as a bad detokenization would), one asking for SLOW tokens
    takes 50 ms a token (so that a client can leave in the middle of it)."""
    assert gate.wait(120)
    engine = Engine(ckpt, CONFIG)
    real = engine.outputs._next

    def next_token(req, *args):
        if req.params.max_tokens == FAULTY:
            raise RuntimeError("a fault in this request's results")
        if req.params.max_tokens == SLOW:
            time.sleep(0.05)
        return real(req, *args)

    engine.outputs._next = next_token
    return engine


def counted(host) -> dict[str, float]:
    samples = (s for m in host.metrics.registry.collect() for s in m.samples)
    return {s.labels["outcome"]: s.value for s in samples if s.name == "meshserve_requests_total"}


def once(host, call):
    """What `call()` returned (or raised), and the outcome it was counted under: it must be counted
    exactly once (outcomes of a call that ends abruptly are counted when the server notices)."""
    before = counted(host)
    try:
        seen = call()
    except Exception as e:
        seen = e
    deadline = time.monotonic() + 20
    while sum(counted(host).values()) == sum(before.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a second count would show by now
    after = counted(host)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert len(delta) == 1 and list(delta.values()) == [1.0], delta
    return seen, next(iter(delta))


class HostThread:
    """A process host on its own event loop in a thread (as ServerThread is for the gRPC server)."""

    def __init__(self, host):
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(host.start())

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        try:
            self.run(self.host.shutdown(0))
            self.run(self.host.wait_closed())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)


def hogging(host, loop_of):
    """A context in which every page is taken, so that a request waits in the queue (and times out)."""
    class Hog:
        def __enter__(self):
            self.pages = loop_of(host.loop.call(lambda e: e.kv.blocks.grow([], e.kv.num_free * CONFIG.page_size)))
            assert self.pages
            return self

        def __exit__(self, *exc):
            loop_of(host.loop.call(lambda e: e.kv.blocks.release(self.pages)))
    return Hog()


# ---- gRPC and HTTP, on one server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    gate = threading.Event()
    with ServerThread(SERVER, lambda: build(tiny_ckpt, gate)) as s:
        host = s.server
        s.run = lambda coro: asyncio.run_coroutine_threadsafe(coro, s._loop).result(60)
        s.grpc = lambda token=TOKEN: Client(f"127.0.0.1:{s.port}", token=token)
        s.http = lambda token=TOKEN: openai.OpenAI(base_url=f"http://127.0.0.1:{host.http.port}/v1", api_key=token,
                                                   max_retries=0)
        s.warming = {"grpc": once(host, lambda: grpc_call(s, text="x", max_tokens=2)),  # the engine compiling
                     "http": once(host, lambda: s.http().completions.create(model="tiny", prompt="x", max_tokens=2))}
        gate.set()
        s.wait_ready()
        yield s


def grpc_call(s, token=TOKEN, cancel_after: int | None = None, **kwargs):
    with s.grpc(token) as c:
        call = c.generate(timeout=60, **kwargs)
        last = None
        for n, last in enumerate(call, 1):
            if n == cancel_after:
                call.cancel()
                return "cancelled"
        return last


def http_call(s, token=TOKEN, leave_after: int | None = None, **kwargs):
    c = s.http(token)
    if leave_after is None:
        return c.completions.create(model="tiny", prompt="a b", **kwargs)
    with c.completions.create(model="tiny", prompt="a b", stream=True, **kwargs) as stream:
        for n, _ in enumerate(stream, 1):
            if n == leave_after:
                return "left"


GRPC = {  # outcome → (the call, what its client sees)
    "stop": (dict(text="a b", max_tokens=8, stop_token_ids=list(range(VOCAB)), temperature=0.0),
             lambda r: r.finish_reason == pb.FINISH_REASON_STOP),
    "length": (dict(text="a b", max_tokens=2, ignore_eos=True), lambda r: r.finish_reason == pb.FINISH_REASON_LENGTH),
    "abort": (dict(text="a b", max_tokens=SLOW, ignore_eos=True, cancel_after=1), lambda r: r == "cancelled"),
    "error": (dict(text="a b", max_tokens=FAULTY, ignore_eos=True), grpc.StatusCode.INTERNAL),
    "rejected": (dict(text="a b", max_tokens=2), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "invalid": (dict(text="a b", max_tokens=2, temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
    "unauthenticated": (dict(text="a b", max_tokens=2, token="wrong"), grpc.StatusCode.UNAUTHENTICATED),
}
HTTP = {
    "stop": (dict(max_tokens=8, temperature=0, extra_body={"stop_token_ids": list(range(VOCAB))}),
             lambda r: r.choices[0].finish_reason == "stop"),
    "length": (dict(max_tokens=2, extra_body={"ignore_eos": True}), lambda r: r.choices[0].finish_reason == "length"),
    "abort": (dict(max_tokens=SLOW, extra_body={"ignore_eos": True}, leave_after=1), lambda r: r == "left"),
    "error": (dict(max_tokens=FAULTY, extra_body={"ignore_eos": True}), 500),
    "rejected": (dict(max_tokens=2), 429),
    "invalid": (dict(max_tokens=2, temperature=-1), 400),
    "unauthenticated": (dict(max_tokens=2, token="wrong"), 401),
}


def check(seen, expected, status_of):
    if callable(expected):
        assert not isinstance(seen, Exception) and expected(seen), seen
    else:
        assert isinstance(seen, Exception) and status_of(seen) == expected, seen


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("outcome", OUTCOMES)
def test_each_outcome_is_counted_once_by_grpc_and_http(server, transport, outcome):
    if outcome == "unavailable":  # asked while the engine was compiling (the fixture)
        seen, counted_as = server.warming[transport]
        status = seen.code() if transport == "grpc" else seen.status_code
        assert counted_as == "unavailable" and status == (grpc.StatusCode.UNAVAILABLE if transport == "grpc" else 503)
        return
    kwargs, expected = (GRPC if transport == "grpc" else HTTP)[outcome]
    call = (lambda: grpc_call(server, **kwargs)) if transport == "grpc" else (lambda: http_call(server, **kwargs))
    if outcome == "rejected":
        with hogging(server.server, server.run):
            seen, counted_as = once(server.server, call)
    else:
        seen, counted_as = once(server.server, call)
    check(seen, expected, (lambda e: e.code()) if transport == "grpc" else (lambda e: e.status_code))
    assert counted_as == outcome


# ---- the Dynamo worker's handler ----------------------------------------------------------------------


class Offline(Worker):
    """The worker with Dynamo's runtime left out: its handler, on its own process host."""

    async def ready(self, host):
        pass

    async def stop(self, grace):
        pass


class Context:
    """What the handler uses of the request context Dynamo gives it: an id, and whether the caller
    stopped the request."""

    def __init__(self, rid: str):
        self.rid, self.stopped = rid, asyncio.Event()

    def id(self) -> str:
        return self.rid

    async def async_killed_or_stopped(self) -> bool:
        await self.stopped.wait()
        return True


@pytest.fixture(scope="module")
def worker(tiny_ckpt):
    gate = threading.Event()
    w = Offline(dataclasses.replace(SERVER, auth_tokens=()), lambda: build(tiny_ckpt, gate))
    t = HostThread(w.host)
    try:
        w.call = lambda request, stop_after=None: t.run(_collect(w, request, stop_after), timeout=60)
        w.run = t.run
        w.warming = once(w.host, lambda: w.call({"token_ids": [1, 2], "stop_conditions": {"max_tokens": 2}}))
        gate.set()
        t.run(w.host.wait_ready())
        yield w
    finally:
        t.close()


async def _collect(w: Worker, request: dict, stop_after: int | None) -> list[dict]:
    context, chunks = Context(f"req-{time.monotonic_ns()}"), []
    async for chunk in w.generate(request, context):
        chunks.append(chunk)
        if len(chunks) == stop_after:
            context.stopped.set()  # the frontend's client went away: Dynamo stops the request
    return chunks


def worker_request(max_tokens: int, **stop_conditions) -> dict:
    return {"token_ids": [1, 2, 3], "sampling_options": {"temperature": 0.0},
            "stop_conditions": {"max_tokens": max_tokens, "ignore_eos": True, **stop_conditions}}


WORKER = {  # outcome → (the request, stop after this many chunks, what the handler gave)
    "stop": (worker_request(8, ignore_eos=False, stop_token_ids=list(range(VOCAB))), None,
             lambda r: r[-1]["finish_reason"] == "stop"),
    "length": (worker_request(2), None, lambda r: r[-1]["finish_reason"] == "length"),
    "abort": (worker_request(SLOW), 1, lambda r: r[-1]["finish_reason"] == "cancelled" and len(r) < SLOW),
    "error": (worker_request(FAULTY), None, RequestFailed),
    "rejected": (worker_request(2), None, RequestRejected),
    # Dynamo's InvalidArgument: the frontend answers 400 with the message
    "invalid": ({**worker_request(2), "token_ids": [VOCAB + 5]}, None, InvalidArgument),
}


@pytest.mark.parametrize("outcome", [o for o in OUTCOMES if o != "unauthenticated"])  # Dynamo's frontend authenticates
def test_each_outcome_is_counted_once_by_the_dynamo_worker(worker, outcome):
    if outcome == "unavailable":  # asked while the engine was compiling (the fixture)
        seen, counted_as = worker.warming
        assert counted_as == "unavailable" and isinstance(seen, EngineUnavailable), seen
        return
    request, stop_after, expected = WORKER[outcome]
    call = lambda: worker.call(request, stop_after)  # noqa: E731
    if outcome == "rejected":
        with hogging(worker.host, worker.run):
            seen, counted_as = once(worker.host, call)
    else:
        seen, counted_as = once(worker.host, call)
    if isinstance(expected, type):
        assert isinstance(seen, expected), seen
    else:
        assert not isinstance(seen, Exception) and expected(seen), seen
    assert counted_as == outcome
