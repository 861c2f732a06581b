"""One line per start-up stage on stderr: what a user watches while a model loads and its programs
compile (`meshserve serve`, `worker`). Off unless the command line turns it on, so tests and
embedding programs stay quiet."""

from __future__ import annotations

import sys
import threading
import time

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def stage(message: str) -> None:
    if _enabled:
        print(f"meshserve: {message}", file=sys.stderr, flush=True)


class Counter:
    """`what i/N` lines as steps finish (from any thread), with the time left at the pace so far."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self._start = time.perf_counter()
        self._lock = threading.Lock()

    def step(self) -> None:
        with self._lock:
            self.done += 1
            elapsed = time.perf_counter() - self._start
            left = elapsed / self.done * (self.total - self.done)
            tail = f", about {left:.0f} s left" if self.done < self.total else ""
            stage(f"{self.what} {self.done}/{self.total} ({elapsed:.0f} s{tail})")
