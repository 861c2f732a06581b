"""Time and chance that the processes of one mesh agree on.

When one engine spans several processes (a multi-host mesh), every process runs the same scheduler
on the same requests and must make the same decisions, or they call different programs and hang in
a collective. Two inputs of those decisions are not the same everywhere by nature: the clock (queue
timeouts) and fresh random seeds (requests without one). `MeshClock` takes both from process 0.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import numpy as np


class Clock:
    """One process: its own monotonic clock and its own randomness."""

    def now(self) -> float:
        return time.monotonic()

    def agree(self, value: int) -> int:
        """`value` as process 0 has it (here: as it is)."""
        return value


class MeshClock(Clock):
    """Every reading is process 0's, broadcast to all (one tiny collective per call: the engine
    reads the clock once per step)."""

    def now(self) -> float:
        micros = int(time.monotonic() * 1e6)
        return self._broadcast(micros) / 1e6

    def agree(self, value: int) -> int:
        return self._broadcast(value)

    @staticmethod
    def _broadcast(value: int) -> int:
        """A non-negative integer < 2**62 from process 0, as two int32 halves (jax runs in 32 bits)."""
        from jax.experimental import multihost_utils

        hi, lo = divmod(value, 2**31)
        got = multihost_utils.broadcast_one_to_all(np.array([hi, lo], np.int32))
        return int(got[0]) * 2**31 + int(got[1])


def clock_for(process_count: int) -> Clock:
    return MeshClock() if process_count > 1 else Clock()


class Seeds:
    """Seeds for requests that bring none: drawn from one base seed per engine (agreed across the
    mesh's processes) and the request's id, so every process samples the same tokens."""

    def __init__(self, clock: Clock):
        self._base = clock.agree(secrets.randbits(62))

    def for_request(self, request_id: str) -> int:
        digest = hashlib.blake2b(f"{self._base}:{request_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % 2**31
