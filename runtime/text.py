"""Streaming text out of generated tokens: UTF-8-safe deltas, with stop strings held back.

Text that might still turn into a stop string is not emitted until it cannot. The output ends right
before the first stop string to be completed (of two completed by the same character, the longer,
which started earlier); a stop string therefore never starts inside text already sent.

Matching is an Aho–Corasick automaton over all stop strings, fed one character at a time: its state
is the longest suffix of the text so far that is a prefix of some stop string, which is exactly
what must be held back. Each generated character costs O(1) amortized, however many stop strings a
request has and however long they are.
"""

from __future__ import annotations

from collections import deque

from meshserve.models.tokenizer import IncrementalDecoder, Tokenizer


class StopMatcher:
    """    trie of "ab", "bc":   0 ─a→ 1 ─b→ 2(ab)      fail links: 2 → 3, 1 → 0, 3 → 0
                                 └─b→ 3 ─c→ 4(bc)
    `state` moves by `feed`; `held` is its depth."""

    def __init__(self, stops: tuple[str, ...]):
        self._next: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._fail = [0]
        self._match = [0]  # length of the longest stop string ending in this state (0: none)
        for stop in stops:
            state = 0
            for ch in stop:
                if ch not in self._next[state]:
                    self._next.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._fail.append(0)
                    self._match.append(0)
                    self._next[state][ch] = len(self._next) - 1
                state = self._next[state][ch]
            self._match[state] = len(stop)
        queue = deque(self._next[0].values())  # breadth first: a fail link points to a shallower state
        while queue:
            state = queue.popleft()
            if not self._match[state]:
                self._match[state] = self._match[self._fail[state]]
            for ch, child in self._next[state].items():
                self._fail[child] = self._step(self._fail[state], ch) if state else 0
                queue.append(child)
        self.state = 0

    def _step(self, state: int, ch: str) -> int:
        while ch not in self._next[state] and state:
            state = self._fail[state]
        return self._next[state].get(ch, 0)

    def feed(self, text: str) -> tuple[int, int] | None:
        """Advance over `text`; at the first completed stop string, (its end in `text`, its length)."""
        for i, ch in enumerate(text):
            self.state = self._step(self.state, ch)
            if self._match[self.state]:
                return i + 1, self._match[self.state]
        return None

    @property
    def held(self) -> int:
        return self._depth[self.state]


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopMatcher(stop) if stop else None
        self._pending = ""  # text not sent yet: the part that may still begin a stop string
        self.stopped_by: str | None = None

    def push(self, token_id: int, stops: bool = True) -> str:
        """The text this token releases ('' while held back). Sets `stopped_by` on a stop string.
        `stops=False` (before min_tokens): no stop string may end the text yet; none is looked for."""
        if not stops and self._stops is not None:
            out, self._pending = self._pending + self._decoder.push(token_id), ""
            self._stops.state = 0
            return out
        return self._release(self._decoder.push(token_id))

    def finish(self) -> str:
        """Everything still held back, once the stream has ended for another reason."""
        out = self._release(self._decoder.flush())
        if self.stopped_by is None:
            out, self._pending = out + self._pending, ""
        return out

    def _release(self, delta: str) -> str:
        if self.stopped_by is not None:
            return ""
        if self._stops is None:
            return delta
        hit = self._stops.feed(delta)
        text = self._pending + delta
        if hit is not None:
            end, length = hit
            end += len(self._pending)
            self.stopped_by = text[end - length:end]
            self._pending = ""
            return text[:end - length]
        keep = self._stops.held
        self._pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


class NoText:
    """TextStream's stand-in for a request that wants token ids only (SamplingParams.detokenize
    False): no text, no stop string, nothing decoded."""

    stopped_by = None

    def push(self, token_id: int, stops: bool = True) -> str:
        return ""

    def finish(self) -> str:
        return ""
