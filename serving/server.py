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
import errno
import json
import logging
import socket
import threading
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshserve.models.errors import MeshserveError, RequestError
from meshserve.runtime import progress as stages
from meshserve.runtime.engine import Engine, EngineConfig, RequestOutput
from meshserve.runtime.grammar import Guided
from meshserve.runtime.sampling import MAX_LOGPROBS
from meshserve.serving.config import ServerConfig
from meshserve.serving.host import EXIT_ENGINE_FAILED, ProcessHost, listen_error  # noqa: F401  (the exit code, for callers)
from meshserve.serving.http import HTTPTransport
from meshserve.serving.metrics import Metrics
from meshserve.serving.preprocess import Preprocessor, Prompt
from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb
from meshserve.serving.session import bearer_ok, outcome_of
from meshserve.serving.tools import ToolCalling, read_all

log = logging.getLogger("meshserve.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "meshserve.v1.Generation"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
          "error": pb.FINISH_REASON_ERROR}


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
                                                  "logprobs", "num_speculative_tokens") if s.HasField(name)}
    if s.stop:
        values["stop"] = tuple(s.stop)
    if s.stop_token_ids:
        values["stop_token_ids"] = tuple(s.stop_token_ids)
    values["ignore_eos"] = s.ignore_eos
    kind = s.WhichOneof("constraint")
    if kind == "json_schema":
        try:
            values["guided"] = Guided.json_schema(json.loads(s.json_schema))
        except ValueError as e:
            raise RequestError(f"sampling.json_schema is not JSON: {e}") from None
    elif kind == "json_object" and s.json_object:
        values["guided"] = Guided("json_object")
    elif kind == "regex":
        values["guided"] = Guided("regex", s.regex)
    elif kind == "choice":
        values["guided"] = Guided.choice(list(s.choice.choices))
    elif kind == "grammar":
        values["guided"] = Guided("grammar", s.grammar)
    return values


def _tools(request: pb.GenerateRequest) -> ToolCalling | None:
    """The request's tools in the OpenAI shape, parsed as the HTTP API parses them."""
    if not request.tools:
        if request.tool_choice not in ("", "auto", "none"):
            raise RequestError("tool_choice: no tools were given")
        return None
    tools = []
    for i, t in enumerate(request.tools):
        try:
            parameters = json.loads(t.parameters) if t.parameters else None
        except ValueError as e:
            raise RequestError(f"tools[{i}].parameters is not JSON: {e}") from None
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": parameters}})
    choice = request.tool_choice or "auto"
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None
    return ToolCalling.parse(tools, choice, parallel)


def _prompt(text: str, token_ids, messages, tools: ToolCalling | None = None) -> Prompt:
    def message(m) -> dict:
        out = {"role": m.role, "content": m.content}
        if m.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id:
            out["tool_call_id"] = m.tool_call_id
        return out
    return Prompt(text=text or None, token_ids=list(token_ids) or None,
                  messages=[message(m) for m in messages] or None, tools=tools)


class GenerationService:
    """meshserve.v1.Generation: parses the wire format, hands the rest to the preprocessor and a
    session with the engine loop, and maps outcomes to status codes. Every Generate call is counted
    once in `meshserve_requests_total`, whatever its outcome."""

    def __init__(self, host: ProcessHost):
        self.host = host

    async def _ready(self, context, request, session=None) -> Preprocessor:
        """The preprocessor, if the request parsed and the server is serving; else the call ends."""
        if isinstance(request, _Undecodable):
            if session is not None:
                session.settle("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        pre = self.host.serving()
        if pre is None:
            if session is not None:
                session.settle("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.host.unavailable())
        return pre

    async def Generate(self, request: pb.GenerateRequest, context):
        async with self.host.session(time.monotonic()) as session:
            pre = await self._ready(context, request, session)
            try:
                sampling = _sampling(request.sampling)
                tools = _tools(request)
                if tools is not None and not request.messages:
                    raise RequestError("tools: give chat messages (the tools reach the model through its chat "
                                       "template)")
                if tools is not None and tools.guided() is not None:
                    if "guided" in sampling:
                        raise RequestError("tool_choice constrains the output already: drop sampling's constraint")
                    sampling["guided"] = tools.guided()
                async with self.host.admitting():  # in flight from here on: a graceful stop waits for it
                    prepared = await pre.run(pre.prepare,
                                             _prompt(request.text, request.token_ids, request.messages, tools),
                                             sampling, priority=request.priority,
                                             request_id=request.request_id or None, arrival=session.arrival)
                    await session.admit([prepared])
                text = []
                async for out in session.outputs(prepared.request_id):
                    text.append(out.text)
                    response = self._response(prepared.request_id, out, session.stream(prepared.request_id))
                    if out.finished and tools is not None:
                        _, calls = read_all(tools, "".join(text))
                        response.tool_calls.extend(pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                                                   for c in calls)
                        if calls and out.finish_reason == "stop":
                            response.finish_reason = pb.FINISH_REASON_TOOL_CALLS
                    yield response
            except Exception as e:  # this request only: its status code, counted by its outcome
                session.fail(e)
                await context.abort(*_status(e))

    @staticmethod
    def _response(rid: str, out: RequestOutput, stream) -> pb.GenerateResponse:
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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input: set exactly one of text, messages")
        try:
            ids = await pre.run(pre.encode, _prompt(request.text, (), request.messages))
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        pre = await self._ready(context, request)
        try:
            text = await pre.run(pre.decode, list(request.token_ids))
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context):
        await self._ready(context, request)
        info = self.host.info
        return pb.ModelInfoResponse(
            name=info.served_name, architecture=info.model.architecture, context_length=info.context_length,
            vocab_size=info.vocab_size, dtype=info.dtype, mesh=info.mesh, max_logprobs=MAX_LOGPROBS,
            priority_levels=info.priority_levels, page_size=info.page_size, kv_fingerprint=info.kv_fingerprint)

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


STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "rejected": grpc.StatusCode.RESOURCE_EXHAUSTED,
          "unavailable": grpc.StatusCode.UNAVAILABLE, "unauthenticated": grpc.StatusCode.UNAUTHENTICATED}


def _status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call ended by `error` gets (INTERNAL: a fault of this request)."""
    code = STATUS.get(outcome_of(error), grpc.StatusCode.INTERNAL)
    known = isinstance(error, MeshserveError)
    return code, str(error) if known else f"{type(error).__name__}: {error}"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens in the `authorization` metadata; health checks need none."""

    def __init__(self, tokens: tuple[str, ...], metrics: Metrics):
        self._tokens = tokens
        self._metrics = metrics

    def _ok(self, metadata) -> bool:
        return any(key == "authorization" and bearer_ok(value, self._tokens) for key, value in metadata or ())

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


def _in_use(host: str, port: int) -> bool:
    """Whether another socket listens on host:port (binding as a server would, then letting go)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


class GrpcTransport:
    """meshserve.v1.Generation, health and reflection on `server.port` (a transport of the host)."""

    def __init__(self):
        self.health_servicer = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self, host: ProcessHost) -> None:
        cfg = host.config
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes), ("grpc.so_reuseport", 0)]
        interceptors = [AuthInterceptor(cfg.auth_tokens, host.metrics)] if cfg.auth_tokens else []
        server = grpc.aio.server(interceptors=interceptors, options=options)
        server.add_generic_rpc_handlers((GenerationService(host).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self.health(False)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            try:
                creds = grpc.ssl_server_credentials([(open(cfg.tls_key, "rb").read(), open(cfg.tls_cert, "rb").read())])
            except OSError as e:
                raise MeshserveError(f"cannot read the TLS certificate or key: {e}") from None
        if cfg.port and _in_use(cfg.host, cfg.port):  # gRPC's own error names neither the port nor the cause
            raise MeshserveError(listen_error("--grpc-port", cfg.host, cfg.port, "gRPC",
                                              OSError(errno.EADDRINUSE, "in use")))
        try:
            port = server.add_secure_port(address, creds) if cfg.tls_cert else server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise MeshserveError(f"--grpc-port {cfg.port}: cannot listen on {address} (gRPC)")
        self.port = port
        await server.start()
        self._server = server
        self._host = cfg.host
        log.info("meshserve gRPC listening on %s:%d", cfg.host, port)

    def describe(self) -> str:
        return f"gRPC {self._host}:{self.port}"

    async def ready(self, host: ProcessHost) -> None:
        pass

    async def health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health_servicer.set(name, status)

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace=grace)


# ---- the server --------------------------------------------------------------------------------


class Server(ProcessHost):
    """`meshserve serve`'s process: the host (serving/host.py) with the gRPC transport (unless
    `server.port` is null) and the OpenAI HTTP one (when `server.http_port` is set). `build` loads
    the model and returns a compiled Engine; it runs on the engine thread, after the ports are
    open, so health checks answer (NOT_SERVING) while the programs compile."""

    def __init__(self, config: ServerConfig, build: Callable[[], Engine], mirror=None):
        super().__init__(config, build, mirror=mirror)
        self.http = self.register(HTTPTransport()) if config.http_port is not None else None
        self.grpc = self.register(GrpcTransport()) if config.port is not None else None

    @property
    def port(self) -> int | None:
        return self.grpc.port if self.grpc is not None else None

    @property
    def health(self):
        return self.grpc.health_servicer if self.grpc is not None else None


async def serve_forever(server: ProcessHost) -> int:
    """Run until SIGTERM or SIGINT (exit code 0) or an engine failure (EXIT_ENGINE_FAILED)."""
    return await server.serve_forever()


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

        mesh = config.mesh_config()
        layout = None if mesh is None else mesh.setup()
        folder = config.model or default_checkpoint(progress=progress)
        stages.stage(f"loading {folder}" + (f" over {layout.describe()}" if layout is not None else ""))
        if layout is None:
            ckpt = load_checkpoint(folder, progress=progress)
        else:
            from meshserve.sharding.mesh import load_sharded

            layout.for_model(read_meta(folder)[1])
            ckpt = load_sharded(folder, layout, progress=progress)
        return Engine(ckpt, engine_config, layout=layout)

    return build
