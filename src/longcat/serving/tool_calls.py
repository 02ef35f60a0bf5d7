"""LongCat tool calls in generated text, as OpenAI `tool_calls`.

The model writes each call as `<longcat_tool_call>\\n{"name": ..., "arguments": {...}}\\n</longcat_tool_call>`,
several back to back without a separator (the format of LongCat-Flash-Chat's chat template). A block
whose body is not a JSON object with a string `name` and object (or JSON-string) `arguments`, or that
never closes, stays in the text as it was written: a malformed call is returned as content, never an
error. Text around the calls is content.

`parse_tool_calls` reads a whole output; `ToolCallStream` reads it delta by delta and gives the same
result, holding back text that may be the start of an opening tag until the next delta decides it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

OPEN = "<longcat_tool_call>"
CLOSE = "</longcat_tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as a string, the way OpenAI returns it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_call(body: str) -> ToolCall | None:
    """The text between the tags -> a ToolCall, or None when it is not a well-formed call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole output -> (content, calls)."""
    stream = ToolCallStream()
    content, calls = stream.push(text)
    more, last = stream.finish()
    return content + more, calls + last


class ToolCallStream:
    def __init__(self) -> None:
        self.buffer = ""  # held-back text: a possible opening tag, or an open block
        self.inside = False

    def push(self, delta: str) -> tuple[str, list[ToolCall]]:
        """New text -> (content that is certain now, calls completed by it)."""
        self.buffer += delta
        content, calls = [], []
        while True:
            if self.inside:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    break
                raw = self.buffer[: end + len(CLOSE)]
                call = parse_call(raw[len(OPEN) : end])
                if call is None:
                    content.append(raw)
                else:
                    calls.append(call)
                self.buffer, self.inside = self.buffer[end + len(CLOSE) :], False
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                content.append(self.buffer[:start])
                self.buffer, self.inside = self.buffer[start:], True
                continue
            keep = _partial_tag(self.buffer)
            content.append(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: held-back text (an unclosed block included) is content."""
        rest, self.buffer, self.inside = self.buffer, "", False
        return rest, []


def _partial_tag(text: str) -> int:
    """How many trailing characters of `text` are a proper prefix of the opening tag."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
