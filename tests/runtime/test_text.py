"""Stop strings are held back until they can no longer match, and never emitted."""

import pytest
from hypothesis import given, settings, strategies as st

from meshserve.runtime.text import TextStream


class CharTokenizer:
    """One token per character: the stream logic, not the tokenizer, is under test here."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def run(text, stop):
    stream = TextStream(CharTokenizer(), tuple(stop))
    deltas = []
    for ch in text:
        deltas.append(stream.push(ord(ch)))
        if stream.stopped_by:
            break
    deltas.append(stream.finish())
    return deltas, stream.stopped_by


def test_stop_string_cuts_the_text_before_it():
    deltas, hit = run("Hello, World! The end.", ["World"])
    assert "".join(deltas) == "Hello, " and hit == "World"


def test_text_that_may_become_a_stop_string_is_held_back():
    deltas, hit = run("a Wo Wor b", ["World"])
    assert hit is None and "".join(deltas) == "a Wo Wor b"
    # "W", "Wo", "Wor" were held until the next character ruled them out
    assert deltas[:4] == ["a", " ", "", ""]


@pytest.mark.parametrize("stops", [["xyz", "lo W"], ["lo W", "xyz"]])
def test_earliest_stop_wins(stops):
    deltas, hit = run("Hello World xyz", stops)
    assert "".join(deltas) == "Hel" and hit == "lo W"


def test_no_stop_strings_streams_everything():
    deltas, hit = run("plain", [])
    assert deltas[:5] == list("plain") and hit is None


def reference_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Brute force: the stop string that completes first (the longer one on a tie) and the text before it."""
    best = None  # (end, -length)
    for s in stops:
        at = text.find(s)
        while at >= 0:
            key = (at + len(s), -len(s))
            best = key if best is None or key < best else best
            at = text.find(s, at + 1)
    if best is None:
        return text, None
    end, length = best[0], -best[1]
    return text[:end - length], text[end - length:end]


class ChunkTokenizer:
    """Token i decodes to the i-th chunk of one text."""

    def __init__(self, text, bounds):
        self.text, self.bounds = text, bounds

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.text[self.bounds[i - 1]:self.bounds[i]] for i in ids)


alphabet = st.sampled_from("abcab ")


@settings(max_examples=400, derandomize=True, deadline=None)
@given(text=st.text(alphabet, max_size=40), stops=st.lists(st.text(alphabet, min_size=1, max_size=6), max_size=5),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_matches_a_brute_force_reference_whatever_the_chunking(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    stream = TextStream(ChunkTokenizer(text, bounds), tuple(stops))
    out = []
    for i in range(1, len(bounds)):  # each "token" releases one chunk of the text
        out.append(stream.push(i))
        if stream.stopped_by:
            break
    out.append(stream.finish())
    assert ("".join(out), stream.stopped_by) == reference_cut(text, stops)


def test_before_min_tokens_no_stop_string_ends_the_text():
    stream = TextStream(CharTokenizer(), ("ab",))
    out = [stream.push(ord(c), stops=False) for c in "xab"]  # "ab" appears before min_tokens
    out += [stream.push(ord(c)) for c in "cab"]  # … and again after: this one stops it
    out.append(stream.finish())
    assert "".join(out) == "xabc" and stream.stopped_by == "ab"
