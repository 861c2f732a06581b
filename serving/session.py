"""What every transport does per call, written once: the bearer check, the outcome a call is counted
under, and the session of one call with the engine loop.

    async with loop.session(metrics) as session:      # counted once, by outcome, when it ends
        await session.admit([request, …])             # all or none, in one engine step
        async for out in session.outputs(request_id): # its outputs; EngineUnavailable, RequestRejected,
            …                                         # RequestFailed instead of a last one
    # a call that ends early (a client gone, an error) aborts what it left running

A transport parses its wire format, preprocesses (serving/preprocess.py), runs a session, and maps
what comes out to its wire format: the outcome labels, like the engine's checks, are the same for
gRPC, HTTP and the Dynamo worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from typing import TYPE_CHECKING, AsyncIterator

from meshserve.models.errors import MeshserveError, RequestError
from meshserve.runtime.engine import QueueFullError
from meshserve.runtime.outputs import RequestOutput
from meshserve.runtime.request import Request
from meshserve.serving.metrics import OUTCOMES, Metrics

if TYPE_CHECKING:
    from meshserve.serving.engine_loop import EngineLoop, Stream


class Unauthenticated(MeshserveError):
    """A missing or wrong bearer token (gRPC: UNAUTHENTICATED, HTTP: 401)."""


def bearer_ok(authorization: str | None, tokens) -> bool:
    """Whether an `authorization` value is `Bearer <one of tokens>` (compared in constant time)."""
    if not isinstance(authorization, str) or not authorization.startswith("Bearer "):
        return False
    # bytes as they came (a header's non-UTF-8 bytes arrive as surrogates): never an exception
    given = authorization[len("Bearer "):].encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(given, t.encode()) for t in tokens)


def outcome_of(error: BaseException) -> str:
    """The outcome a call is counted under when `error` ends it (an error of a transport's own may
    say, by an `outcome` attribute)."""
    from meshserve.serving.engine_loop import EngineUnavailable, RequestRejected

    own = getattr(error, "outcome", None)
    if own in OUTCOMES:
        return own
    if isinstance(error, RequestError):
        return "invalid"
    if isinstance(error, (QueueFullError, RequestRejected)):
        return "rejected"
    if isinstance(error, EngineUnavailable):
        return "unavailable"
    if isinstance(error, Unauthenticated):
        return "unauthenticated"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "abort"  # the caller went away
    return "error"  # RequestFailed, and any fault of this request's


class Session:
    """One call of a transport with the engine loop, from its first step to its last."""

    def __init__(self, loop: "EngineLoop", metrics: "Metrics", arrival: float):
        self.loop, self.metrics, self.arrival = loop, metrics, arrival
        self.outcome: str | None = None  # settled: the first request's finish reason, or the error's outcome
        self.streams: dict[str, "Stream"] = {}
        self._done: set[str] = set()

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self.outcome is None:
            self.outcome = outcome_of(exc) if exc is not None else "abort"
        for rid, stream in self.streams.items():
            if rid not in self._done:  # whatever ended the call: nothing of it left running
                self.loop.abort(rid, stream)
        self.metrics.requests.labels(self.outcome).inc()
        return False

    def settle(self, outcome: str) -> None:
        """The call's outcome, when the transport knows it first (before it raises its wire error)."""
        if self.outcome is None:
            self.outcome = outcome

    def fail(self, error: BaseException) -> None:
        self.settle(outcome_of(error))

    async def admit(self, requests: list[Request]) -> None:
        """Hand the requests to the engine in one step, all or none (a fork after its original);
        raises what the engine refused them with (RequestError, QueueFullError, EngineUnavailable)."""
        from meshserve.serving.engine_loop import Stream

        admissions = [(r, Stream(asyncio.get_running_loop(), asyncio.Queue(), self.arrival)) for r in requests]
        for r, stream in admissions:
            self.streams[r.request_id] = stream
        try:
            await self.loop.admit_all(admissions)
        except Exception:
            self._done.update(r.request_id for r in requests)  # refused: none of them was kept
            raise

    async def outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs, the last one finished (its finish reason settles the call's
        outcome if it is the call's first request)."""
        stream = self.streams[request_id]
        async with contextlib.aclosing(self.loop.outputs(request_id, stream)) as outputs:
            try:
                async for out in outputs:
                    if out.finished:
                        self._done.add(request_id)
                        if request_id == next(iter(self.streams)):
                            self.settle(out.finish_reason)
                    yield out
            except MeshserveError:
                self._done.add(request_id)  # ended by the loop (unavailable, rejected, failed)
                raise

    def stream(self, request_id: str) -> "Stream":
        return self.streams[request_id]
