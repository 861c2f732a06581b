"""The gRPC server: meshserve.v1.Generation, grpc.health.v1.Health, reflection, Prometheus metrics.

    asyncio (grpc.aio handlers)  ──submit / abort──▶  EngineLoop thread (owns the Engine)
            ▲                                                 │ engine.step()
            └──────── per-request asyncio.Queue ◀─────────────┘ outputs, via call_soon_threadsafe

The engine is single-threaded and lives on its own thread; handlers only hand requests over and
read their outputs. Health is NOT_SERVING until the engine has loaded the model and compiled every
program, and again once shutdown begins. A cancelled call or an expired deadline aborts its request
before the engine's next step, which frees its pages. SIGTERM stops admissions, lets in-flight
requests finish for `drain_timeout_s`, then aborts the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import logging
import queue
import signal
import threading
import time
import traceback
import uuid
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from models.errors import MeshserveError, RequestError
from runtime.engine import Engine, EngineConfig, QueueFullError, RequestOutput
from runtime.sampling import MAX_LOGPROBS, SamplingParams
from serving.config import ServerConfig
from serving.metrics import Metrics
from serving.proto.meshserve.v1 import generation_pb2 as pb
from serving.proto.meshserve.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("meshserve.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "meshserve.v1.Generation"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
          "error": pb.FINISH_REASON_ERROR}
MAX_REQUEST_ID = 256


# ---- the engine thread -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Stream:
    """One request as both sides see it: outputs go to `queue` on the handler's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = 0.0
    first: float | None = None  # time of the first token
    last: float | None = None  # time of the latest token


class EngineLoop(threading.Thread):
    """Owns the Engine: builds it (load + compile), then runs steps while there is work."""

    def __init__(self, build: Callable[[], Engine], metrics: Metrics, on_ready: Callable[[], None]):
        super().__init__(name="meshserve-engine", daemon=True)
        self._build = build
        self._metrics = metrics
        self._on_ready = on_ready
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._seen: dict[int, int] = {}  # engine totals already added to each metric
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()

    # called from other threads
    def submit(self, ids: list[int], params: SamplingParams, priority: int, request_id: str | None,
               stream: _Stream) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", (ids, params, priority, request_id, stream), future))
        return future

    def abort(self, request_id: str, stream: _Stream | None = None) -> None:
        """Abort a request (only if it still belongs to `stream`, when given)."""
        self._inbox.put(("abort", (request_id, stream), None))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all", None, None))

    def stop(self) -> None:
        self._inbox.put(("stop", None, None))

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # the thread
    def run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as e:  # reported by the server; nothing to serve
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self._on_ready()
        engine = self.engine
        while True:
            idle = not engine.has_unfinished
            try:
                commands = [self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, arg, future in commands:
                if kind == "stop":
                    self._abort_all()
                    try:
                        engine.persist_prefix_cache()  # so a restart on the same store finds them
                    except Exception:
                        log.error("persisting the prefix cache failed:\n%s", traceback.format_exc())
                    return
                try:
                    self._command(kind, arg, future)
                except Exception:  # never let a command take the loop down
                    log.error("engine command %s failed:\n%s", kind, traceback.format_exc())
            if engine.has_unfinished:
                try:
                    outputs = engine.step()
                except Exception as e:  # a fault of the whole step: fail what it held, keep serving
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    outputs = self._fail_all(f"{type(e).__name__}: {e}")
                try:
                    self._dispatch(outputs)
                except Exception:
                    log.error("dispatching outputs failed:\n%s", traceback.format_exc())
            stats = engine.scheduler.describe()
            m = self._metrics
            m.running.set(stats["running"])
            m.waiting.set(stats["waiting"])
            m.pages_used.set(stats["pages_used"])
            m.pages_total.set(stats["pages_total"])
            m.pages_cached.set(stats["pages_cached"])
            counts = [(m.prefix_queried.labels("all"), stats["prefix_queried_tokens"]),
                      (m.prefix_hits.labels("device"), stats["prefix_hit_tokens"])]
            if engine.host_tier is not None:
                tiers, ps, pb = engine.stats(), engine.config.page_size, engine.page_bytes
                m.tier_pages.labels("host").set(tiers["pages_host"])
                m.tier_pages.labels("store").set(tiers.get("pages_store", 0))
                counts += [(m.prefix_hits.labels("host"), tiers["host_hit_pages"] * ps),
                           (m.prefix_hits.labels("store"), tiers["store_hit_pages"] * ps),
                           (m.pages_moved.labels("device_to_host"), tiers["host_pages_out"]),
                           (m.pages_moved.labels("host_to_device"), tiers["host_pages_in"]),
                           (m.bytes_moved.labels("device_to_host"), tiers["host_pages_out"] * pb),
                           (m.bytes_moved.labels("host_to_device"), tiers["host_pages_in"] * pb)]
                if "store_pages_written" in tiers:
                    counts += [(m.pages_moved.labels("host_to_store"), tiers["store_pages_written"]),
                               (m.bytes_moved.labels("host_to_store"), tiers["store_pages_written"] * pb)]
            for counter, total in counts:  # the engine keeps totals; counters take increments
                counter.inc(total - self._seen.get(id(counter), 0))
                self._seen[id(counter)] = total

    def _command(self, kind, arg, future) -> None:
        engine = self.engine
        if kind == "add":
            ids, params, priority, request_id, stream = arg
            if not future.set_running_or_notify_cancel():
                return  # the caller went away before the request was taken
            try:
                rid = engine.add_request(ids, params, request_id=request_id, priority=priority)
            except Exception as e:  # bad input, a full queue, or a fault: that request only
                future.set_exception(e)
                return
            stream.arrival = time.monotonic()
            self._streams[rid] = stream
            self._metrics.prompt_tokens.inc(len(ids))
            future.set_result(rid)
        elif kind == "abort":
            rid, stream = arg
            if stream is not None and self._streams.get(rid) is not stream:
                return  # finished already, or the id now names another caller's request
            if engine.abort(rid):
                self._end(rid, RequestOutput(rid, (), "", finished=True, finish_reason="abort"))
        elif kind == "abort_all":
            self._abort_all()

    def _abort_all(self) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)
            self._end(rid, RequestOutput(rid, (), "", finished=True, finish_reason="abort"))

    def _fail_all(self, error: str) -> list[RequestOutput]:
        outputs = []
        for rid in list(self._streams):
            self.engine.abort(rid)
            outputs.append(RequestOutput(rid, (), "", finished=True, finish_reason="error", error=error))
        return outputs

    def _end(self, rid: str, out: RequestOutput) -> None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            self._metrics.requests.labels(out.finish_reason).inc()
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        m = self._metrics
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.token_ids:
                if stream.first is None:
                    stream.first = now
                    m.ttft.observe(now - stream.arrival)
                    if out.queue_time_s is not None:
                        m.queue.observe(out.queue_time_s)
                else:
                    m.itl.observe(now - stream.last)
                stream.last = now
                m.generation_tokens.inc(len(out.token_ids))
            if out.finished:
                if stream.first is not None:
                    m.e2e.observe(now - stream.arrival)
                self._end(out.request_id, out)
            else:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)


# ---- the gRPC service --------------------------------------------------------------------------


def _parse_sampling(s: pb.SamplingOptions) -> SamplingParams:
    values = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "max_tokens", "logprobs"):
        if s.HasField(name):
            values[name] = getattr(s, name)
    if s.stop:
        values["stop"] = tuple(s.stop)
    if s.stop_token_ids:
        values["stop_token_ids"] = tuple(s.stop_token_ids)
    values["ignore_eos"] = s.ignore_eos
    return SamplingParams(**values)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, server: "Server"):
        self.server = server

    async def _engine(self, context) -> Engine:
        engine = self.server.engine_ready()
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up (compiling); retry shortly")
        if self.server.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return engine

    def _encode(self, engine: Engine, text: str, token_ids, messages) -> list[int]:
        given = [name for name, v in (("text", text), ("token_ids", token_ids), ("messages", messages)) if v]
        if len(given) != 1:
            raise RequestError("input: set exactly one of text, token_ids, messages"
                               + (f" (got {' and '.join(given)})" if given else " (got none)"))
        if text:
            return engine.tokenizer.encode(text)
        if token_ids:
            return list(token_ids)
        for i, m in enumerate(messages):
            if not m.role:
                raise RequestError(f"messages[{i}].role is empty")
        try:
            return engine.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages])
        except Exception as e:  # a template error names what was wrong with the messages
            raise RequestError(f"messages: the chat template failed: {e}") from None

    async def _invalid(self, context, message: str):
        self.server.metrics.requests.labels("invalid").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def Generate(self, request: pb.GenerateRequest, context):
        engine = await self._engine(context)
        try:
            ids = self._encode(engine, request.text, request.token_ids, request.messages)
            params = _parse_sampling(request.sampling)
            if not request.sampling.HasField("max_tokens"):  # unset: up to 256, within the context
                params = dataclasses.replace(params, max_tokens=max(1, min(params.max_tokens,
                                                                           engine.max_seq_len - len(ids))))
            rid = request.request_id or None
            if rid is not None and (len(rid) > MAX_REQUEST_ID or not rid.isprintable()):
                raise RequestError(f"request_id must be printable and at most {MAX_REQUEST_ID} characters")
        except RequestError as e:
            await self._invalid(context, str(e))
        rid = rid or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        try:
            await asyncio.wrap_future(self.server.loop.submit(ids, params, request.priority, rid, stream))
        except asyncio.CancelledError:  # gone while being admitted: undo the admission, if it happened
            self.server.loop.abort(rid, stream)
            raise
        except RequestError as e:
            await self._invalid(context, str(e))
        except QueueFullError as e:
            self.server.metrics.requests.labels("rejected").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Exception as e:
            self.server.metrics.requests.labels("error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        done = False
        try:
            while True:
                out: RequestOutput = await stream.queue.get()
                if out.finish_reason == "rejected":  # waited in the queue past its timeout
                    done = True
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, out.error or "rejected")
                if out.finish_reason == "error":
                    done = True
                    await context.abort(grpc.StatusCode.INTERNAL, f"request {rid} failed: {out.error}")
                yield self._response(rid, out, stream)
                if out.finished:
                    done = True
                    return
        finally:
            if not done:  # the client went away (cancel, deadline): free its pages now
                self.server.loop.abort(rid, stream)

    @staticmethod
    def _response(rid: str, out: RequestOutput, stream: _Stream) -> pb.GenerateResponse:
        resp = pb.GenerateResponse(request_id=rid, token_ids=list(out.token_ids), text=out.text)
        for lp in out.logprobs:
            resp.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                                 top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]))
        if out.finished:
            resp.finish_reason = FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
            resp.usage.CopyFrom(pb.Usage(
                prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                cached_tokens=out.cached_tokens,
                time_to_first_token_s=(stream.first - stream.arrival) if stream.first else 0.0,
                queue_time_s=out.queue_time_s or 0.0))
        return resp

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        engine = await self._engine(context)
        if bool(request.text) == bool(request.messages):
            await self._invalid(context, "input: set exactly one of text, messages")
        try:
            ids = self._encode(engine, request.text, None, request.messages)
        except RequestError as e:
            await self._invalid(context, str(e))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        engine = await self._engine(context)
        vocab = engine.model_config.vocab_size
        bad = next((t for t in request.token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            await self._invalid(context, f"token_ids: {bad} is outside the vocabulary (size {vocab})")
        return pb.DetokenizeResponse(text=engine.tokenizer.decode(list(request.token_ids)))

    async def ModelInfo(self, request: pb.ModelInfoRequest, context):
        engine = await self._engine(context)
        c = engine.model_config
        return pb.ModelInfoResponse(
            name=c.name, architecture=c.architecture, context_length=engine.max_seq_len, vocab_size=c.vocab_size,
            dtype=str(engine.checkpoint.dtype), mesh=engine.layout.describe(), max_logprobs=MAX_LOGPROBS,
            priority_levels=engine.config.priority_levels)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens in the `authorization` metadata; health checks need none."""

    def __init__(self, tokens: tuple[str, ...], metrics: Metrics):
        self._tokens = [t.encode() for t in tokens]
        self._metrics = metrics

    def _ok(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value[len("Bearer "):].encode()
                return any(hmac.compare_digest(given, t) for t in self._tokens)
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/") \
                or self._ok(details.invocation_metadata):
            return handler
        self._metrics.requests.labels("unauthenticated").inc()
        message = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, as a streaming handler must be

        kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                 (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(deny_stream if handler.response_streaming else deny,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


# ---- the server --------------------------------------------------------------------------------


class Server:
    """`build` loads the model and returns a compiled Engine; it runs on the engine thread, after
    the port is open, so health checks answer (NOT_SERVING) while the programs compile."""

    def __init__(self, config: ServerConfig, build: Callable[[], Engine]):
        self.config = config
        self.metrics = Metrics()
        self.loop = EngineLoop(build, self.metrics, self._on_ready)
        self.health = health.aio.HealthServicer()
        self.draining = False
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    def engine_ready(self) -> Engine | None:
        return self.loop.engine if self.loop.ready.is_set() and self.loop.error is None else None

    def _on_ready(self) -> None:  # on the engine thread
        self._aio_loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._set_health(True)))

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def start(self) -> None:
        import jax

        cfg = self.config
        self._aio_loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        jax.monitoring.register_event_duration_secs_listener(self._count_compile)
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        interceptors = [AuthInterceptor(cfg.auth_tokens, self.metrics)] if cfg.auth_tokens else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_GenerationServicer_to_server(GenerationService(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(False)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            try:
                creds = grpc.ssl_server_credentials([(open(cfg.tls_key, "rb").read(), open(cfg.tls_cert, "rb").read())])
            except OSError as e:
                raise MeshserveError(f"cannot read the TLS certificate or key: {e}") from None
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise MeshserveError(f"cannot listen on {address}")
        self.port = port
        await server.start()
        self._grpc = server
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        self.loop.start()

    def _count_compile(self, event: str, secs: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.metrics.compilations.inc()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until warm-up is over; raises the build's error if it failed."""
        await asyncio.get_running_loop().run_in_executor(None, self.loop.ready.wait, timeout)
        if self.loop.error is not None:
            raise self.loop.error

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish (up to the drain timeout), abort the rest."""
        if self.draining:
            return
        self.draining = True
        await self._set_health(False)
        deadline = time.monotonic() + (self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        while self.loop.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.loop.abort_all()
        await asyncio.sleep(0.1)  # let the aborts reach their streams
        await self._grpc.stop(grace=1.0)
        self.loop.stop()
        self.metrics.close()
        import jax

        jax.monitoring.unregister_event_duration_listener(self._count_compile)
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve_forever(server: Server) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.shutdown()))
    log.warning("meshserve listening on %s:%d (metrics on %s); warming up", server.config.host, server.port,
                server.metrics_port)
    ready = asyncio.ensure_future(server.wait_ready())
    closed = asyncio.ensure_future(server.wait_closed())
    await asyncio.wait([ready, closed], return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        await server.shutdown(0)
        raise ready.exception()
    if ready.done():
        log.warning("meshserve serving %s", server.loop.engine.model_config.name)
    await closed


class ServerThread:
    """A server on its own event loop in a background thread (tests, embedding):

        with ServerThread(config, build) as s:   # returns once the port is open
            s.wait_ready(); ... localhost:s.port ...
    """

    def __init__(self, config: ServerConfig, build: Callable[[], Engine]):
        self.server = Server(config, build)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meshserve-grpc", daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.server.port

    def wait_ready(self, timeout: float = 600) -> None:
        asyncio.run_coroutine_threadsafe(self.server.wait_ready(timeout), self._loop).result(timeout=timeout + 5)

    def shutdown(self, drain_timeout_s: float | None = None, timeout: float = 120) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(drain_timeout_s), self._loop).result(timeout=timeout)

    def stop(self) -> None:
        if self._loop.is_running():
            try:
                self.shutdown(0)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=30)


def build_engine(config: ServerConfig, engine_config: EngineConfig, progress: bool = True) -> Callable[[], Engine]:
    """The usual build: the mesh (if any), the checkpoint (the default model if none), the engine."""
    def build() -> Engine:
        from models.checkpoint import load_checkpoint, read_meta
        from models.default import default_checkpoint

        layout = None
        if config.mesh:
            from sharding.mesh import MeshConfig

            layout = MeshConfig.from_yaml(config.mesh).setup()
        folder = config.model or default_checkpoint(progress=progress)
        if layout is None:
            ckpt = load_checkpoint(folder, progress=progress)
        else:
            from sharding.mesh import load_sharded

            layout.for_model(read_meta(folder)[1])
            ckpt = load_sharded(folder, layout, progress=progress)
        return Engine(ckpt, engine_config, layout=layout)

    return build
