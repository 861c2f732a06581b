"""Streaming text out of generated tokens: UTF-8-safe deltas, with stop strings held back.

Text that might still turn into a stop string is not emitted until it cannot: after each token the
longest suffix of the pending text that is a prefix of some stop string stays pending. A stop string
therefore never starts inside text already sent, and the output ends right before it.
"""

from __future__ import annotations

from models.tokenizer import IncrementalDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._pending = ""
        self.stopped_by: str | None = None

    def push(self, token_id: int) -> str:
        """The text this token releases ('' while held back). Sets `stopped_by` on a stop string."""
        self._pending += self._decoder.push(token_id)
        return self._release()

    def finish(self) -> str:
        """Everything still held back, once the stream has ended for another reason."""
        self._pending += self._decoder.flush()
        out = self._release()
        if self.stopped_by is None:
            out, self._pending = out + self._pending, ""
        return out

    def _release(self) -> str:
        if not self._stop or self.stopped_by is not None:
            out, self._pending = self._pending, ""
            return out if self.stopped_by is None else ""
        hits = [(self._pending.find(s), s) for s in self._stop if s in self._pending]
        if hits:
            at, self.stopped_by = min(hits)
            out, self._pending = self._pending[:at], ""
            return out
        hold = max((n for s in self._stop for n in range(min(len(s) - 1, len(self._pending)), 0, -1)
                    if self._pending.endswith(s[:n])), default=0)
        out = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        return out
