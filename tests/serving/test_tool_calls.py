"""LongCat tool-call parsing: whole outputs, and the same outputs streamed in two pieces split at every
position (the stream parser must hold back a partial opening tag and an open block)."""

from __future__ import annotations

import json

import pytest

from longcat.serving.tool_calls import ToolCallStream, parse_call, parse_tool_calls

CALL_A = '<longcat_tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</longcat_tool_call>'
CALL_B = '<longcat_tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, 3]}}\n</longcat_tool_call>'
BROKEN = '<longcat_tool_call>\n{"name": "get_weather", "arguments": {"city": \n</longcat_tool_call>'

CASES = [
    ("no calls at all <longcat", "no calls at all <longcat", []),
    (CALL_A, "", [("get_weather", {"city": "Paris"})]),
    ("Let me check." + CALL_A + CALL_B, "Let me check.",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": [2, 3]})]),
    ("before " + BROKEN + " after", "before " + BROKEN + " after", []),
    (CALL_A + BROKEN, BROKEN, [("get_weather", {"city": "Paris"})]),
    ("text " + CALL_A[:-5], "text " + CALL_A[:-5], []),  # never closed: returned as text
    ('<longcat_tool_call>\n{"name": "f", "arguments": "{\\"x\\": 2}"}\n</longcat_tool_call>', "", [("f", {"x": 2})]),
    ('<longcat_tool_call>\n["not", "an", "object"]\n</longcat_tool_call>x',
     '<longcat_tool_call>\n["not", "an", "object"]\n</longcat_tool_call>x', []),
    ('<longcat_tool_call>\n{"arguments": {}}\n</longcat_tool_call>',
     '<longcat_tool_call>\n{"arguments": {}}\n</longcat_tool_call>', []),
]  # fmt: skip


def _calls(calls) -> list[tuple[str, dict]]:  # noqa: ANN001
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_whole_output(text: str, content: str, calls: list) -> None:
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert _calls(got_calls) == calls
    assert all(c.id.startswith("call_") for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text,content,calls", CASES)
def test_streamed_split_at_every_position(text: str, content: str, calls: list) -> None:
    for cut in range(len(text) + 1):
        stream = ToolCallStream()
        pieces, found = [], []
        for delta in (text[:cut], text[cut:]):
            more, new = stream.push(delta)
            pieces.append(more)
            found += new
        more, new = stream.finish()
        pieces.append(more)
        found += new
        assert "".join(pieces) == content, cut
        assert _calls(found) == calls, cut


def test_streamed_character_by_character_holds_back_only_tag_prefixes() -> None:
    stream = ToolCallStream()
    out = []
    for ch in "Hi <longcat_tool_call>":
        text, _ = stream.push(ch)
        out.append(text)
    assert "".join(out) == "Hi "  # the tag is held: it may open a call
    text, calls = stream.push('\n{"name": "f", "arguments": {}}\n</longcat_tool_call> bye')
    assert text == " bye" and [c.name for c in calls] == ["f"]


def test_parse_call_refuses_bad_bodies() -> None:
    assert parse_call('{"name": "f", "arguments": {"x": 1}}').arguments == '{"x": 1}'
    for body in (
        "",
        "{",
        '{"name": ""}',
        '{"name": 3}',
        '{"name": "f", "arguments": 5}',
        '{"name": "f", "arguments": "[1]"}',
    ):
        assert parse_call(body) is None, body
