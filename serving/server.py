"""The gRPC server: meshserve.v1.Generation, grpc.health.v1.Health, reflection, Prometheus metrics.

    grpc.aio handlers ──preprocess (thread pool)──▶ EngineLoop.submit ──▶ engine thread
            ▲                                                                 │
            └──────────── per-request asyncio.Queue ◀─────────────────────────┘

This module is the gRPC transport and the process's lifecycle; request preprocessing lives in
serving/preprocess.py and the engine's thread in serving/engine_loop.py, shared with any other
transport. Health is NOT_SERVING until the engine has loaded the model and compiled every program,
and again once shutdown begins or the engine fails. A cancelled call or an expired deadline aborts
its request before the engine's next step, which frees its pages. SIGTERM stops admissions, lets
in-flight requests finish for `drain_timeout_s`, aborts the rest, writes the prefix cache to the
store tier and exits 0; an engine failure ends every stream with UNAVAILABLE and exits
EXIT_ENGINE_FAILED (see the failure contract in serving/engine_loop.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import threading
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshserve.models.errors import MeshserveError, RequestError
from meshserve.runtime.engine import Engine, EngineConfig, QueueFullError, RequestOutput
from meshserve.runtime.sampling import MAX_LOGPROBS
from meshserve.serving.config import ServerConfig
from meshserve.serving.engine_loop import (EngineLoop, EngineUnavailable, RequestFailed, RequestRejected, State,
                                           Stream)
from meshserve.serving.http import HTTPFrontend
from meshserve.serving.metrics import Metrics
from meshserve.serving.preprocess import EngineFacts, Preprocessor, Prompt
from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb

log = logging.getLogger("meshserve.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "meshserve.v1.Generation"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
          "error": pb.FINISH_REASON_ERROR}
EXIT_ENGINE_FAILED = 3  # the process's exit code after an engine failure
STOP_TIMEOUT_S = 600.0  # longest wait for the engine thread to persist the prefix cache and end


# ---- the gRPC service --------------------------------------------------------------------------


class _Undecodable:
    """A request whose bytes are not a valid message (e.g. a string field that is not UTF-8): the
    handler answers INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    def __init__(self, error: str):
        self.error = error


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return _Undecodable(f"the request is not a valid {message_cls.DESCRIPTOR.full_name}: {e}")
    return parse


def _sampling(s: pb.SamplingOptions) -> dict:
    """The sampling options a request set (unset ones take the engine's defaults)."""
    values = {name: getattr(s, name) for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                                  "presence_penalty", "frequency_penalty", "seed", "max_tokens",
                                                  "logprobs") if s.HasField(name)}
    if s.stop:
        values["stop"] = tuple(s.stop)
    if s.stop_token_ids:
        values["stop_token_ids"] = tuple(s.stop_token_ids)
    values["ignore_eos"] = s.ignore_eos
    return values


def _prompt(text: str, token_ids, messages) -> Prompt:
    return Prompt(text=text or None, token_ids=list(token_ids) or None,
                  messages=[{"role": m.role, "content": m.content} for m in messages] or None)


class GenerationService:
    """meshserve.v1.Generation: parses the wire format, hands the rest to the preprocessor and the
    engine loop, and maps their outcomes to status codes. Every Generate call is counted once in
    `meshserve_requests_total`, whatever its outcome."""

    def __init__(self, server: "Server"):
        self.server = server

    async def _ready(self, context, request, ends=lambda outcome: None) -> Preprocessor:
        """The preprocessor, if the request parsed and the server is serving; else the call ends."""
        if isinstance(request, _Undecodable):
            ends("invalid")
            await self._invalid(context, request.error)
        pre = self.server.serving()
        if pre is None:
            ends("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.server.unavailable())
        return pre

    async def _invalid(self, context, message: str):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def Generate(self, request: pb.GenerateRequest, context):
        arrival = time.monotonic()
        outcome = ["abort"]  # until known otherwise: the client went away
        try:
            async for resp in self._generate(request, context, arrival, outcome):
                yield resp
        finally:
            self.server.metrics.requests.labels(outcome[0]).inc()

    async def _generate(self, request, context, arrival: float, outcome: list):
        def ends(how: str):
            outcome[0] = how

        pre = await self._ready(context, request, ends)
        loop = self.server.loop
        try:
            async with self.server.admitting():  # in flight from here on: a graceful stop waits for it
                prepared = await pre.run(pre.prepare, _prompt(request.text, request.token_ids, request.messages),
                                         _sampling(request.sampling), priority=request.priority,
                                         request_id=request.request_id or None, arrival=arrival)
                stream = Stream(asyncio.get_running_loop(), asyncio.Queue(), arrival)
                await loop.admit(prepared, stream)
            async with contextlib.aclosing(loop.outputs(prepared.request_id, stream)) as outputs:
                async for out in outputs:
                    if out.finished:
                        ends(out.finish_reason)
                    yield self._response(prepared.request_id, out, stream)
        except RequestError as e:
            ends("invalid")
            await self._invalid(context, str(e))
        except (QueueFullError, RequestRejected) as e:
            ends("rejected")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineUnavailable as e:
            ends("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except RequestFailed as e:
            ends("error")
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        except Exception as e:  # a fault of preprocessing or admission: this request only
            ends("error")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    @staticmethod
    def _response(rid: str, out: RequestOutput, stream: Stream) -> pb.GenerateResponse:
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
        pre = await self._ready(context, request)
        if bool(request.text) == bool(request.messages):
            await self._invalid(context, "input: set exactly one of text, messages")
        try:
            ids = await pre.run(pre.encode, _prompt(request.text, (), request.messages))
        except RequestError as e:
            await self._invalid(context, str(e))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        pre = await self._ready(context, request)
        try:
            text = await pre.run(pre.decode, list(request.token_ids))
        except RequestError as e:
            await self._invalid(context, str(e))
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context):
        await self._ready(context, request)
        engine = self.server.loop.engine
        c = engine.model_config
        return pb.ModelInfoResponse(
            name=c.name, architecture=c.architecture, context_length=engine.max_seq_len, vocab_size=c.vocab_size,
            dtype=str(engine.checkpoint.dtype), mesh=engine.layout.describe(), max_logprobs=MAX_LOGPROBS,
            priority_levels=engine.config.priority_levels, page_size=engine.config.page_size,
            kv_fingerprint=engine.fingerprint.hex())

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods, with requests parsed leniently (see _Undecodable)."""
        methods = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, _lenient(pb.GenerateRequest), pb.GenerateResponse.SerializeToString),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self.Tokenize, _lenient(pb.TokenizeRequest), pb.TokenizeResponse.SerializeToString),
            "Detokenize": grpc.unary_unary_rpc_method_handler(
                self.Detokenize, _lenient(pb.DetokenizeRequest), pb.DetokenizeResponse.SerializeToString),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.ModelInfo, _lenient(pb.ModelInfoRequest), pb.ModelInfoResponse.SerializeToString),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)


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
        if details.method == f"/{SERVICE}/Generate":  # counted with the other Generate outcomes
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
    the port is open, so health checks answer (NOT_SERVING) while the programs compile.

    Lifecycle: STARTING (NOT_SERVING) → SERVING → on SIGTERM: drain, abort the rest, persist the
    prefix cache, exit 0; on an engine failure: NOT_SERVING at once, every stream ended with
    UNAVAILABLE, `exit_code` EXIT_ENGINE_FAILED (the process exits for a supervisor to restart it)."""

    def __init__(self, config: ServerConfig, build: Callable[[], Engine], mirror=None):
        self.config = config
        self.metrics = Metrics()
        self.loop = EngineLoop(build, self.metrics, step_timeout_s=config.step_timeout_s,
                               on_ready=self._on_ready, on_failure=self._on_failure, mirror=mirror)
        self.health = health.aio.HealthServicer()
        self.draining = False
        self._admitting = 0  # requests being preprocessed or handed to the engine
        self.preprocessor: Preprocessor | None = None
        self.exit_code = 0
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: HTTPFrontend | None = None  # the OpenAI-compatible API, when server.http_port is set
        self._grpc: grpc.aio.Server | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    def serving(self) -> Preprocessor | None:
        """The preprocessor while requests are admitted; None while warming up, draining or failed."""
        if self.draining or self.loop.state is not State.SERVING:
            return None
        return self.preprocessor

    @contextlib.asynccontextmanager
    async def admitting(self):
        """Around a request's preprocessing and admission: a graceful stop waits for it too."""
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    def unavailable(self) -> str:
        if self.loop.state is State.SERVING:  # the engine is, this server is not (yet, or any more)
            return "the server is shutting down" if self.draining else "the server is warming up; retry shortly"
        return str(self.loop.unavailable())

    def _on_ready(self, engine: Engine) -> None:  # on the engine thread
        self.preprocessor = Preprocessor(engine.tokenizer, EngineFacts.of(engine))
        self._aio_loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._set_health(True)))

    def _on_failure(self, reason: str) -> None:  # on the engine or watchdog thread
        self._aio_loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._fail(reason)))

    async def _fail(self, reason: str) -> None:
        """The engine cannot go on: say so at once, stop listening, let the process exit non-zero."""
        await self._set_health(False)
        self.exit_code = EXIT_ENGINE_FAILED
        if self.draining:  # a shutdown in progress finishes the job
            return
        self.draining = True
        await self._close(grace=1.0)  # every stream has had its status already

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        async with self._health_lock:  # one change at a time: a failure never interleaves with "ready"
            if serving and (self.loop.state is not State.SERVING or self.draining):
                return  # failed or stopping before this could run
            for name in ("", SERVICE):
                await self.health.set(name, status)

    async def start(self) -> None:
        import jax

        cfg = self.config
        self._aio_loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._health_lock = asyncio.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._count_compile)
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        interceptors = [AuthInterceptor(cfg.auth_tokens, self.metrics)] if cfg.auth_tokens else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        server.add_generic_rpc_handlers((GenerationService(self).handler(),))
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
        if cfg.http_port is not None:
            self.http = HTTPFrontend(self)
            try:
                await self.http.start(cfg.host, cfg.http_port)
            except OSError as e:
                raise MeshserveError(f"cannot listen on {cfg.host}:{cfg.http_port} (HTTP): {e.strerror}") from None
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
        """Stop admitting, let in-flight requests finish (up to the drain timeout), abort the rest,
        then stop the engine thread (which persists the prefix cache) and wait for it."""
        if self.draining:
            return
        self.draining = True
        await self._set_health(False)
        deadline = time.monotonic() + (self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        while ((self.loop.in_flight or self._admitting) and time.monotonic() < deadline
               and self.loop.state is State.SERVING):
            await asyncio.sleep(0.05)
        self.loop.abort_all()
        await self._close(grace=1.0)

    async def _close(self, grace: float) -> None:
        await asyncio.sleep(0.1)  # let the last outputs reach their streams
        if self.http is not None:
            await self.http.stop()
        await self._grpc.stop(grace=grace)
        if self.loop.state is not State.FAILED:  # a failed engine thread may be stuck: never wait on it
            await asyncio.get_running_loop().run_in_executor(None, self.loop.stop, STOP_TIMEOUT_S)
        if self.preprocessor is not None:
            self.preprocessor.close()
        self.metrics.close()
        import jax

        jax.monitoring.unregister_event_duration_listener(self._count_compile)
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def serve_forever(server: Server) -> int:
    """Run until SIGTERM or SIGINT (then shut down gracefully: exit code 0) or an engine failure
    (EXIT_ENGINE_FAILED); returns the exit code."""
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
    if ready.done() and server.loop.state is State.SERVING:
        log.warning("meshserve serving %s", server.loop.engine.model_config.name)
    await closed
    return server.exit_code


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

    def wait_closed(self, timeout: float = 60) -> None:
        asyncio.run_coroutine_threadsafe(self.server.wait_closed(), self._loop).result(timeout=timeout)

    def stop(self) -> None:
        if self._loop.is_running():
            try:
                self.shutdown(0)
                self.wait_closed()
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=30)


def build_engine(config: ServerConfig, engine_config: EngineConfig, progress: bool = True) -> Callable[[], Engine]:
    """The usual build: the mesh (if any), the checkpoint (the default model if none), the engine."""
    def build() -> Engine:
        from meshserve.models.checkpoint import load_checkpoint, read_meta
        from meshserve.models.default import default_checkpoint

        layout = None
        if config.mesh:
            from meshserve.sharding.mesh import MeshConfig

            layout = MeshConfig.from_yaml(config.mesh).setup()
        folder = config.model or default_checkpoint(progress=progress)
        if layout is None:
            ckpt = load_checkpoint(folder, progress=progress)
        else:
            from meshserve.sharding.mesh import load_sharded

            layout.for_model(read_meta(folder)[1])
            ckpt = load_sharded(folder, layout, progress=progress)
        return Engine(ckpt, engine_config, layout=layout)

    return build
