"""Token ids to streamed text, with stop strings.

Byte-level BPE splits characters across tokens, so the text of a token is known only once the
tokens after it arrive: a delta is emitted when the decoded text no longer ends in U+FFFD (an
incomplete UTF-8 sequence). Decoding re-reads only a short window of recent tokens (the
prefix/read offsets that text-generation-inference and vLLM use), not the whole output each step.

Stop strings (OpenAI `stop`, up to 4): generation ends at the first occurrence, which is not part of
the returned text. Text that could still become the start of a stop string is held back until the
next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already taken
        self.read_offset = 0
        self.text = ""  # all text decoded so far (stop strings included)
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        """Add new token ids; returns the text that is now certain (possibly ""). After a stop string
        matched, `stopped` is True and later pushes return ""."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        previous = self.decode(self.ids[self.prefix_offset : self.read_offset])
        current = self.decode(self.ids[self.prefix_offset :])
        if len(current) > len(previous) and not current.endswith(INCOMPLETE):
            self.text += current[len(previous) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The end of generation: whatever is held back, incomplete characters included."""
        if not self.stopped:
            tail = self.decode(self.ids[self.prefix_offset :])
            previous = self.decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += tail[len(previous) :]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop and not self.stopped:
            # no stop string starts in text already sent: any text that could begin one was held back
            hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                end = len(self.text)
            elif not final:
                end -= self._held_back()
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta

    def _held_back(self) -> int:
        """How many trailing characters could begin a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
