"""Streamed detokenisation with stop strings, against decoding the whole output at once."""

from __future__ import annotations

import pytest

from longcat.serving.detokenize import TextStream


class ByteTokens:
    """Token i is byte i: a multi-byte character spans several tokens, as in byte-level BPE."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: list[str], step: int = 1) -> tuple[str, bool, list[str]]:
    ids = list(text.encode())
    stream = TextStream(ByteTokens().decode, stop)
    deltas = [stream.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(stream.finish())
    return "".join(deltas), stream.stopped, deltas


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_no_stop_gives_the_whole_text_and_never_half_a_character(step: int) -> None:
    text = "naïve café – 東京 ok"
    out, stopped, deltas = _stream(text, [], step)
    assert out == text and not stopped
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stop_strings_end_the_text_before_their_first_occurrence(step: int) -> None:
    text = "one two\nthree STOP four STOP"
    for stop, expected in ((["STOP"], "one two\nthree "), (["\n", "STOP"], "one two"), (["zzz"], text),
                           (["four", "two"], "one "), (["e S"], "one two\nthre")):  # fmt: skip
        out, stopped, _ = _stream(text, stop, step)
        assert out == expected, (stop, step)
        assert stopped == (expected != text)


def test_text_that_may_begin_a_stop_string_is_held_back_until_decided() -> None:
    stream = TextStream(ByteTokens().decode, ["END"])
    assert stream.push(list(b"abc E")) == "abc "
    assert stream.push(list(b"N")) == ""
    assert stream.push(list(b"x")) == "ENx"  # not a stop string after all
    assert stream.push(list(b"EN")) == ""
    assert stream.finish() == "EN"  # the end of generation releases what was held


def test_pushes_after_a_stop_return_nothing() -> None:
    stream = TextStream(ByteTokens().decode, ["b"])
    assert stream.push(list(b"abc")) == "a" and stream.stopped
    assert stream.push(list(b"def")) == "" and stream.finish() == ""
