"""Stop strings are held back until they can no longer match, and never emitted."""

import pytest

from runtime.text import TextStream


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
