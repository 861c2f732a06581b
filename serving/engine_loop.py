"""The engine's own thread, and the contract any transport (gRPC, HTTP, a Dynamo worker) drives it by.

    transport (asyncio) ──submit_all(call) / abort──▶ inbox ──────▶ engine thread: step(), …
          ▲                                                                         │
          └──── Stream.queue ◀── RequestOutput …  (one wake-up per event loop per step) ┘

The engine thread builds the engine (load + compile), then runs steps while there is work, and
sleeps on its inbox when nothing can run (until a new command, or the next queue timeout).

Failure contract (DESIGN.md decision 7, made to hold):
  - a fault in one request ends that request (finish reason "error"); the others go on;
  - a fault the engine cannot survive — EngineFault (a program failed after dispatch: the KV pool
    is unknown), any exception escaping the loop, the thread dying, or one step running longer than
    `step_timeout_s` (the watchdog thread catches the last two) — makes the loop FAILED at once:
    every open stream receives EngineUnavailable, submissions are refused, nothing is persisted,
    and `on_failure` is called once, so the process reports NOT_SERVING and exits non-zero for a
    supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import queue
import threading
import time
import traceback
from typing import Any, AsyncIterator, Callable

from meshserve.models.errors import MeshserveError
from meshserve.runtime.engine import Engine, EngineFault, RequestOutput
from meshserve.serving.metrics import Metrics
from meshserve.runtime.request import Request

log = logging.getLogger("meshserve.engine_loop")

WATCHDOG_PERIOD_S = 0.1


class EngineUnavailable(MeshserveError):
    """The engine is not serving: warming up, shutting down, or failed (gRPC: UNAVAILABLE)."""


class RequestRejected(MeshserveError):
    """The request waited in the queue past its timeout (gRPC: RESOURCE_EXHAUSTED)."""


class RequestFailed(MeshserveError):
    """An internal fault in this request only (gRPC: INTERNAL)."""


class State(enum.Enum):
    STARTING = "starting"  # loading and compiling
    SERVING = "serving"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclasses.dataclass(eq=False)
class Stream:
    """One request as both sides see it: outputs (or one EngineUnavailable) go to `queue`, on the
    event loop `loop` of the transport that submitted it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float  # time.monotonic() when the transport received the request
    first: float | None = None  # time of the first token
    last: float | None = None  # time of the latest token


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class EngineLoop:
    def __init__(self, build: Callable[[], Engine], metrics: Metrics, *, step_timeout_s: float | None = None,
                 on_ready: Callable[[Engine], None] = lambda engine: None,
                 on_failure: Callable[[str], None] = lambda reason: None,
                 on_step: Callable[[Engine], None] | None = None, mirror=None):
        self._build = build
        self._metrics = metrics
        self._step_timeout_s = step_timeout_s
        self._on_ready = on_ready
        self._on_failure = on_failure
        self._on_step = on_step  # on the engine thread after each step (a Dynamo worker's KV events)
        self._mirror = mirror  # a StepMirror (serving/mirror.py) when the engine spans several processes
        self._applied: list[tuple] = []  # this turn's commands, for the mirror
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards state, streams, and admissions against a failure
        self._state = State.STARTING
        self._streams: dict[str, Stream] = {}
        self._seen: dict[int, float] = {}  # engine totals already added to each counter
        self._step_started: float | None = None  # when the step now running began
        self.engine: Engine | None = None
        self.error: BaseException | None = None  # the build's, if it failed
        self.failure: str | None = None  # why the loop failed
        self.ready = threading.Event()  # set once the build finished (or failed)
        self._thread = threading.Thread(target=self._run, name="meshserve-engine", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="meshserve-watchdog", daemon=True)

    # ---- called from other threads -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    @property
    def state(self) -> State:
        return self._state

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def submit_all(self, admissions: list[tuple[Request, Stream]]) -> concurrent.futures.Future:
        """Hand one call's requests to the engine (taken in this order, in one engine step), all or
        none: they count against its queue together (Engine.add_all). The future gives their ids
        once queued, or the engine's RequestError / QueueFullError / EngineUnavailable."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._state is not State.SERVING:
                future.set_exception(self.unavailable())
            else:
                self._inbox.put(("add", list(admissions), future))
        return future

    async def admit_all(self, admissions: list[tuple[Request, Stream]]) -> None:
        """`submit_all` from an event loop. A caller cancelled meanwhile undoes the admission."""
        try:
            await asyncio.wrap_future(self.submit_all(admissions))
        except asyncio.CancelledError:
            for request, stream in admissions:
                self.abort(request.request_id, stream)
            raise

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """fn(engine) on the engine thread, between two steps (the engine is not thread-safe); its
        result or exception. Not mirrored to other processes of a multi-host mesh."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._state is not State.SERVING:
                future.set_exception(self.unavailable())
            else:
                self._inbox.put(("call", fn, future))
        return await asyncio.wrap_future(future)

    def session(self, arrival: float):
        """One call of a transport (serving/session.py): admissions, outputs, the outcome counted."""
        from meshserve.serving.session import Session

        return Session(self, self._metrics, arrival)

    async def outputs(self, request_id: str, stream: Stream) -> AsyncIterator[RequestOutput]:
        """The admitted request's outputs, the last one finished; raises EngineUnavailable,
        RequestRejected or RequestFailed instead of a last output. A consumer that stops early
        (a cancelled call, a client gone) aborts the request before the engine's next step:
        iterate inside `contextlib.aclosing`, so that happens at once."""
        done = False
        try:
            while True:
                out = await stream.queue.get()
                if isinstance(out, EngineUnavailable):
                    done = True
                    raise out
                if out.finished:
                    done = True
                    if out.finish_reason == "rejected":  # waited in the queue past its timeout
                        raise RequestRejected(out.error or "rejected")
                    if out.finish_reason == "error":
                        raise RequestFailed(f"request {request_id} failed: {out.error}")
                yield out
                if out.finished:
                    return
        finally:
            if not done:
                self.abort(request_id, stream)

    def abort(self, request_id: str, stream: Stream | None = None) -> None:
        """Abort a request (only if it still belongs to `stream`, when given)."""
        self._inbox.put(("abort", (request_id, stream), None))

    def abort_all(self) -> None:
        self._inbox.put(("abort_all", None, None))

    def stop(self, timeout: float | None = None) -> None:
        """Abort what is left, persist cached pages (when a store is configured), end the thread;
        returns once it has ended, the loop failed (a stuck step), or `timeout` passed."""
        self._inbox.put(("stop", None, None))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive() and self._state is not State.FAILED:
            if deadline is not None and time.monotonic() >= deadline:
                return
            self._thread.join(WATCHDOG_PERIOD_S)

    def unavailable(self) -> EngineUnavailable:
        if self._state is State.FAILED:
            return EngineUnavailable(f"the engine failed ({self.failure}); the server is restarting")
        if self._state is State.STARTING:
            return EngineUnavailable("the server is warming up (compiling); retry shortly")
        return EngineUnavailable("the server is shutting down")

    # ---- failure -------------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """The engine cannot go on: end every stream, refuse what waits in the inbox, tell the owner.
        Safe from any thread, and only the first call acts."""
        with self._lock:
            if self._state in (State.FAILED, State.STOPPED):
                return
            self._state, self.failure = State.FAILED, reason
            streams, self._streams = self._streams, {}
            waiting = []
            while True:
                try:
                    waiting.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
        log.critical("engine failed: %s", reason)
        error = self.unavailable()
        for kind, _, future in waiting:
            if kind == "add" and future.set_running_or_notify_cancel():
                future.set_exception(error)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream in streams.values():
            by_loop.setdefault(stream.loop, []).append((stream.queue, error))
        self._send(by_loop)
        self._on_failure(reason)

    def _watch(self) -> None:
        """Fails the loop when the engine thread is gone or one step runs past the limit."""
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            state = self._state
            if state in (State.FAILED, State.STOPPED):
                return
            if state is not State.SERVING:
                continue
            if not self._thread.is_alive():
                self.fail("the engine thread died")
                return
            started, limit = self._step_started, self._step_timeout_s
            if started is not None and limit is not None and time.monotonic() - started > limit:
                self.fail(f"one engine step has run for more than {limit:g} s (step_timeout_s)")
                return

    # ---- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._build()
        except BaseException as e:  # reported by the owner; nothing to serve
            self.error = e
            with self._lock:
                self._state = State.STOPPED
            self.ready.set()
            return
        self._update_metrics(self.engine)  # gauges right from the first scrape
        with self._lock:
            self._state = State.SERVING
        self.ready.set()
        self._on_ready(self.engine)
        try:
            self._serve(self.engine)
        except BaseException as e:  # nothing should reach here: the engine's state is not to be trusted
            log.critical("the engine thread died:\n%s", traceback.format_exc())
            self.fail(f"the engine thread died: {type(e).__name__}: {e}")

    def _serve(self, engine: Engine) -> None:
        idle = True
        while True:
            commands = self._commands(engine, block=idle)
            for i, (kind, arg, future) in enumerate(commands):
                if kind == "stop":
                    self._shut(engine, commands[i + 1:])
                    return
                self._command(engine, kind, arg, future)
            if self._state is not State.SERVING:
                return
            stepping = engine.has_unfinished
            if self._mirror is not None and (self._applied or stepping):
                self._mirror.publish(self._applied, stepping)  # the other processes take this turn too
                self._applied = []
            if stepping:
                self._step_started = time.monotonic()
                try:
                    outputs = engine.step()
                except EngineFault as e:
                    self.fail(str(e))
                    return
                finally:
                    self._step_started = None
                self._deliver(outputs)
                idle = engine.idle
                if self._on_step is not None:
                    try:
                        self._on_step(engine)
                    except Exception:  # an observer's fault is logged, never the engine's
                        log.error("the step observer failed:\n%s", traceback.format_exc())
            else:
                idle = True
            self._update_metrics(engine)

    def _commands(self, engine: Engine, block: bool) -> list:
        """Every command waiting; when idle, first sleep until one comes (or a waiting request's
        queue timeout is due)."""
        commands = []
        if block:
            due = engine.next_expiry()
            # time.monotonic() is the engine's clock in this process (and process 0's, which this
            # loop runs on, when a mesh spans several: reading engine.clock there is a collective)
            timeout = None if due is None else max(0.0, due - time.monotonic()) + 1e-3
            try:
                commands.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _command(self, engine: Engine, kind: str, arg, future) -> None:
        if kind == "add":
            if not future.set_running_or_notify_cancel():
                return  # the caller went away before the requests were taken
            try:
                rids = engine.add_all([request for request, _ in arg])  # checked by the preprocessing
            except Exception as e:  # bad input or a full queue: this call only
                future.set_exception(e)
                return
            with self._lock:  # a failure may have ended every stream meanwhile (from the watchdog)
                serving = self._state is State.SERVING
                if serving:
                    self._streams.update((rid, stream) for rid, (_, stream) in zip(rids, arg))
            if not serving:
                for rid in rids:
                    engine.abort(rid)
                future.set_exception(self.unavailable())
                return
            self._metrics.prompt_tokens.inc(sum(len(request.token_ids) for request, _ in arg))
            if self._mirror is not None:
                from meshserve.serving.mirror import add_command

                for request, _ in arg:
                    self._record(add_command(request))
            future.set_result(rids)
        elif kind == "abort":
            rid, stream = arg
            if stream is not None and self._streams.get(rid) is not stream:
                return  # finished already, or the id now names another caller's request
            if engine.abort(rid):
                self._record(("abort", rid))
                self._deliver([RequestOutput(rid, (), "", finished=True, finish_reason="abort")])
        elif kind == "abort_all":
            self._abort_all(engine)
        elif kind == "call":
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(arg(engine))
                except Exception as e:  # the caller's to handle; the engine goes on
                    future.set_exception(e)

    def _record(self, command: tuple) -> None:
        if self._mirror is not None:
            self._applied.append(command)

    def _abort_all(self, engine: Engine) -> None:
        outputs = []
        for rid in list(self._streams):
            engine.abort(rid)
            self._record(("abort", rid))
            outputs.append(RequestOutput(rid, (), "", finished=True, finish_reason="abort"))
        self._deliver(outputs)

    def _shut(self, engine: Engine, after: list) -> None:
        """Abort what runs, refuse what was still to come in, then persist the prefix cache."""
        self._abort_all(engine)
        with self._lock:
            if self._state is not State.SERVING:
                return
            self._state = State.STOPPED
            while True:
                try:
                    after.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
        for kind, _, future in after:
            if kind in ("add", "call") and future.set_running_or_notify_cancel():
                future.set_exception(self.unavailable())
        if self._mirror is not None:
            self._mirror.publish([*self._applied, ("stop",)], False)
            self._applied = []
        if engine.stats().get("store_enabled") is not None:
            try:  # so a restart on the same store finds them
                n = engine.persist_prefix_cache()
                log.warning("wrote the prefix cache to the KV store: it holds %d of the cached pages", n)
            except Exception:
                log.error("persisting the prefix cache failed:\n%s", traceback.format_exc())

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Route a step's outputs to their streams (one wake-up per event loop), with the latency
        metrics. A fault with one output ends that stream only."""
        now = time.monotonic()
        m = self._metrics
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            try:
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
                if out.finished and stream.first is not None:
                    m.e2e.observe(now - stream.arrival)
            except Exception as e:
                log.error("output of %s could not be delivered:\n%s", out.request_id, traceback.format_exc())
                if self.engine is not None:
                    self.engine.abort(out.request_id)
                out = RequestOutput(out.request_id, (), "", finished=True, finish_reason="error",
                                    error=f"{type(e).__name__}: {e}")
            if out.finished:
                with self._lock:
                    self._streams.pop(out.request_id, None)
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        self._send(by_loop)

    @staticmethod
    def _send(by_loop: dict) -> None:
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _update_metrics(self, engine: Engine) -> None:
        """Gauges and counters from the engine's totals; a fault here is logged, never fatal."""
        try:
            stats = engine.stats()
            m = self._metrics
            m.running.set(stats["running"])
            m.waiting.set(stats["waiting"])
            m.pages_used.set(stats["pages_used"])
            m.pages_total.set(stats["pages_total"])
            m.pages_cached.set(stats["pages_cached"])
            m.programs.set(stats["programs"])
            m.router.update(*engine.router_statistics())
            counts = [(m.prefix_queried.labels("all"), stats["prefix_queried_tokens"]),
                      (m.prefix_hits.labels("device"), stats["prefix_hit_tokens"])]
            if "pages_host" in stats:
                ps, pb = stats["page_size"], stats["page_bytes"]
                m.tier_pages.labels("host").set(stats["pages_host"])
                m.tier_pages.labels("store").set(stats.get("pages_store", 0))
                counts += [(m.prefix_hits.labels("host"), stats["host_hit_pages"] * ps),
                           (m.prefix_hits.labels("store"), stats["store_hit_pages"] * ps),
                           (m.pages_moved.labels("device_to_host"), stats["host_pages_out"]),
                           (m.pages_moved.labels("host_to_device"), stats["host_pages_in"]),
                           (m.bytes_moved.labels("device_to_host"), stats["host_pages_out"] * pb),
                           (m.bytes_moved.labels("host_to_device"), stats["host_pages_in"] * pb)]
                if "store_pages_written" in stats:
                    counts += [(m.pages_moved.labels("host_to_store"), stats["store_pages_written"]),
                               (m.bytes_moved.labels("host_to_store"), stats["store_pages_written"] * pb),
                               (m.store_misses, stats["store_misses"]), (m.store_evicted, stats["store_pages_evicted"])]
            if "spec_num_drafts" in stats:
                counts += [(m.spec_drafts, stats["spec_num_drafts"]), (m.spec_draft_tokens, stats["spec_num_draft_tokens"]),
                           (m.spec_accepted, stats["spec_num_accepted_tokens"])]
                counts += [(m.spec_accepted_per_pos.labels(str(i)), n)
                           for i, n in enumerate(stats["spec_accepted_per_position"])]
            for counter, total in counts:  # the engine keeps totals; counters take increments
                counter.inc(total - self._seen.get(id(counter), 0))
                self._seen[id(counter)] = total
        except Exception:
            log.error("updating the metrics failed:\n%s", traceback.format_exc())
