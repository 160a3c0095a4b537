"""Reasoning in ``<think>...</think>``: split streamed model text into reasoning and answer."""
from __future__ import annotations

from .holdback import partial_suffix_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningStream:
    """feed(text) -> (reasoning, content); tags are never emitted, partial tags are held back.

    ``start_inside`` is for templates whose generation prompt already opens ``<think>`` (the
    model then writes only the closing tag). Whitespace right after ``</think>`` is dropped.
    """

    def __init__(self, start_inside: bool = False) -> None:
        self._inside = start_inside
        self._buf = ""
        self._strip_next = False

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            tag = THINK_CLOSE if self._inside else THINK_OPEN
            i = self._buf.find(tag)
            if i < 0:
                break
            self._emit(self._buf[:i], reasoning, content)
            self._buf = self._buf[i + len(tag):]
            self._strip_next = self._inside
            self._inside = not self._inside
        tag = THINK_CLOSE if self._inside else THINK_OPEN
        keep = partial_suffix_len(self._buf, [tag])
        self._emit(self._buf[: len(self._buf) - keep], reasoning, content)
        self._buf = self._buf[len(self._buf) - keep:]
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        self._emit(self._buf, reasoning, content)
        self._buf = ""
        return "".join(reasoning), "".join(content)

    def _emit(self, piece: str, reasoning: list[str], content: list[str]) -> None:
        if self._inside:
            reasoning.append(piece)
            return
        if self._strip_next:
            piece = piece.lstrip()
            if piece:
                self._strip_next = False
        content.append(piece)


def split_reasoning(text: str, start_inside: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole output; the same code path as streaming."""
    stream = ReasoningStream(start_inside)
    r1, c1 = stream.feed(text)
    r2, c2 = stream.flush()
    return r1 + r2, c1 + c2
