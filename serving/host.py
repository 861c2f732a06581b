"""The serving process around one engine, written once for every transport: the engine loop, whether
the process serves (health), what it does on SIGTERM (drain), and its exit code.

    host = ProcessHost(config, build)
    host.register(GrpcTransport(...)); host.register(HTTPTransport(...))   # or a Dynamo worker
    exit_code = await host.serve_forever()

Lifecycle: STARTING (not serving: the transports listen, the engine loads and compiles) → SERVING
(the transports are told, `ready` once, then `health(True)`) → on SIGTERM: stop admitting, let
in-flight requests finish for `drain_timeout_s`, abort the rest, stop the transports, persist the
prefix cache, exit 0; on an engine failure: not serving at once, every stream ended with
UNAVAILABLE, exit code EXIT_ENGINE_FAILED (the process exits for a supervisor to restart it).

A transport is an object with
    async start(host)      listen (before the engine is ready: health checks answer "not serving")
    async ready(host)      the engine is ready (a Dynamo worker joins discovery); raising ends the process
    async health(serving)  tell its clients (gRPC's health service; a worker leaves discovery on False)
    async stop(grace)      stop listening, end what is open
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from typing import Callable

from meshserve.models.errors import MeshserveError
from meshserve.runtime.engine import Engine
from meshserve.serving.config import ServerConfig
from meshserve.serving.engine_loop import EngineLoop, State
from meshserve.serving.info import EngineInfo
from meshserve.serving.metrics import Metrics
from meshserve.serving.preprocess import Preprocessor
from meshserve.serving.session import Session

log = logging.getLogger("meshserve.server")

EXIT_ENGINE_FAILED = 3  # the process's exit code after an engine failure
STOP_TIMEOUT_S = 600.0  # longest wait for the engine thread to persist the prefix cache and end


def listen_error(flag: str, host: str, port: int, what: str, error: OSError) -> str:
    """The one line a port that cannot be listened on gets, naming the flag that sets it."""
    if error.errno == errno.EADDRINUSE:
        return f"{flag} {port}: {host}:{port} is already in use ({what}); choose another port or stop what holds it"
    return f"{flag} {port}: cannot listen on {host}:{port} ({what}): {error.strerror or error}"


class ProcessHost:
    def __init__(self, config: ServerConfig, build: Callable[[], Engine], mirror=None):
        self.config = config
        self.metrics = Metrics()
        self.loop = EngineLoop(build, self.metrics, step_timeout_s=config.step_timeout_s, on_ready=self._on_ready,
                               on_failure=self._on_failure, on_step=self._on_step, mirror=mirror)
        self.transports: list = []
        self.step_observers: list[Callable[[Engine], None]] = []  # on the engine thread after each step
        self.info: EngineInfo | None = None  # once the engine is ready
        self.preprocessor: Preprocessor | None = None
        self.draining = False
        self.exit_code = 0
        self.metrics_port: int | None = None
        self._admitting = 0  # requests being preprocessed or handed to the engine
        self._aio: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._health_lock: asyncio.Lock | None = None

    def register(self, transport):
        self.transports.append(transport)
        return transport

    # ---- what transports ask -------------------------------------------------------------------------

    def serving(self) -> Preprocessor | None:
        """The preprocessor while requests are admitted; None while warming up, draining or failed."""
        if self.draining or self.loop.state is not State.SERVING:
            return None
        return self.preprocessor

    def unavailable(self) -> str:
        if self.loop.state is State.SERVING:  # the engine is, this process is not (yet, or any more)
            return "the server is shutting down" if self.draining else "the server is warming up; retry shortly"
        return str(self.loop.unavailable())

    @contextlib.asynccontextmanager
    async def admitting(self):
        """Around a request's preprocessing and admission: a graceful stop waits for it too."""
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1

    def session(self, arrival: float) -> Session:
        """One call's session with the engine loop (serving/session.py), counted in this host's metrics."""
        return self.loop.session(arrival)

    # ---- the engine's thread -------------------------------------------------------------------------

    def _on_ready(self, engine: Engine) -> None:
        self.info = EngineInfo.of(engine, self.config.served_model_name,
                                 self.config.sampling_defaults(engine.checkpoint.generation))
        self.preprocessor = Preprocessor(self.info)
        self._aio.call_soon_threadsafe(self._ready.set)

    def _on_failure(self, reason: str) -> None:  # on the engine or watchdog thread
        self._aio.call_soon_threadsafe(lambda: asyncio.ensure_future(self._fail(reason)))

    def _on_step(self, engine: Engine) -> None:
        for observe in self.step_observers:
            observe(engine)

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        import jax

        self._aio = asyncio.get_running_loop()
        self._stopped, self._ready, self._health_lock = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._count_compile)
        started = []
        try:
            if self.config.metrics_port is not None:
                try:
                    self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
                except OSError as e:
                    raise MeshserveError(listen_error("--metrics-port", self.config.host, self.config.metrics_port,
                                                      "metrics", e)) from None
            for transport in self.transports:
                await transport.start(self)
                started.append(transport)
        except BaseException:  # a port that cannot be had: close what was opened, then say which
            for transport in reversed(started):
                await transport.stop(0)
            self.metrics.close()
            jax.monitoring.unregister_event_duration_listener(self._count_compile)
            raise
        self.loop.start()

    def _count_compile(self, event: str, secs: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.metrics.compilations.inc()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until warm-up is over and every transport took the engine; raises the build's error (or
        a transport's) if it failed."""
        await asyncio.get_running_loop().run_in_executor(None, self.loop.ready.wait, timeout)
        if self.loop.error is not None:
            raise self.loop.error
        await self._ready.wait()
        for transport in self.transports:
            await transport.ready(self)
        await self._set_health(True)

    async def _set_health(self, serving: bool) -> None:
        async with self._health_lock:  # one change at a time: a failure never interleaves with "ready"
            if serving and (self.loop.state is not State.SERVING or self.draining):
                return  # failed or stopping before this could run
            for transport in self.transports:
                await transport.health(serving)

    async def _fail(self, reason: str) -> None:
        """The engine cannot go on: say so at once, stop listening, let the process exit non-zero."""
        await self._set_health(False)
        self.exit_code = EXIT_ENGINE_FAILED
        if self.draining:  # a shutdown in progress finishes the job
            return
        self.draining = True
        await self._close(grace=1.0)  # every stream has had its status already

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish (up to the drain timeout), abort the rest,
        then stop the transports and the engine thread (which persists the prefix cache)."""
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
        for transport in reversed(self.transports):
            try:
                await transport.stop(grace)
            except Exception:
                log.exception("stopping %s failed", type(transport).__name__)
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

    async def serve_forever(self) -> int:
        """Run until SIGTERM or SIGINT (then shut down gracefully: exit code 0) or an engine failure
        (EXIT_ENGINE_FAILED); returns the exit code. The build's error, or a transport's refusal of
        the engine, is raised after everything is stopped."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.shutdown()))
        ready = asyncio.ensure_future(self.wait_ready())
        closed = asyncio.ensure_future(self.wait_closed())
        await asyncio.wait([ready, closed], return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is not None:
            await self.shutdown(0)
            raise ready.exception()
        if ready.done() and self.loop.state is State.SERVING:
            where = [t.describe() for t in self.transports if getattr(t, "describe", None)]
            log.warning("ready: %s", " · ".join([*where, f"model {self.info.served_name}"]))
        await closed
        return self.exit_code
