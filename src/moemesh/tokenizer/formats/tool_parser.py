"""Hermes / Qwen tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

One streaming parser serves both streamed and whole responses: text outside tool calls comes
out as content, each call comes out once as (id, name) and then as argument fragments, the
shape OpenAI streams. Arguments are streamed as the model writes them; a JSON scanner finds
where the arguments object ends, so the outer ``}`` and the closing tag are never emitted.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .holdback import partial_suffix_len

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
# `{"name": "NAME", "arguments": ` : the head of a call whose arguments can be streamed
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it
    complete: bool = False  # the arguments value ended (balanced brackets)

    @property
    def valid(self) -> bool:
        if not self.complete:
            return False
        try:
            return isinstance(json.loads(self.arguments), dict)
        except ValueError:
            return False


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # set on a call's first delta only, with name
    name: str | None = None
    arguments: str = ""


class _JsonScan:
    """Finds the end of one JSON object or array fed in pieces (string- and escape-aware)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> int:
        """Characters of ``text`` that belong to the value; < len(text) once the value closed."""
        for i, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return len(text)


def _json_string(inner: str) -> str | None:
    try:
        return json.loads(f'"{inner}"')
    except ValueError:
        return None


def parse_call_body(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call body, tolerating trailing text; None if it is not a call."""
    start = body.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(body[start:])
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


class CallStream:
    """What every streamed tool-call parser shares (Hermes here, DeepSeek, GLM/MiniMax/Kimi): the calls
    found so far, the bodies that were not calls, and ``feed``, which buffers text and advances the
    parser (``_advance``: one step, True while it can go on) as far as the buffer allows."""

    def __init__(self) -> None:
        self._buf = ""
        self._strip_next = False  # drop whitespace right after a call
        self.calls: list[ToolCall] = []
        self.invalid_bodies: list[str] = []

    @property
    def complete_calls(self) -> int:
        return sum(c.complete for c in self.calls)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._advance(content, deltas):
            pass
        return "".join(content), deltas

    def _advance(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        raise NotImplementedError

    def _skip_space_after_call(self) -> None:
        """Drop the whitespace right after a call block (once the next non-space text arrives)."""
        if self._strip_next:
            self._buf = self._buf.lstrip()
            self._strip_next = not self._buf

    def _release_text(self, content: list[str], markers: list[str]) -> None:
        """Move the buffer's text to ``content``, holding back a tail that may begin a marker and the
        whitespace before it (dropped if a call block follows)."""
        cut = len(self._buf) - partial_suffix_len(self._buf, markers)
        while cut > 0 and self._buf[cut - 1].isspace():
            cut -= 1
        content.append(self._buf[:cut])
        self._buf = self._buf[cut:]


class ToolCallStream(CallStream):
    """feed(text) -> (content, deltas); finish() -> the same for whatever was held back."""

    def __init__(self, id_prefix: str = "call_") -> None:
        super().__init__()
        self._id_prefix = id_prefix
        self._mode = "text"  # text | head | args | tail | whole
        self._body = ""  # everything after <tool_call> in the current call (for whole parsing)
        self._scan = _JsonScan()
        self._ws_before = ""  # whitespace dropped before the current <tool_call>

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self.feed("")
        if self._mode == "text":
            content += self._buf
        elif self._mode in ("head", "whole"):
            text = self._parse_whole(self._body + self._buf, deltas)
            content += text
        elif self._mode == "args" and self._buf:  # stopped before the arguments began
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=self._buf))
            self.calls[-1].arguments += self._buf
        self._buf = ""
        self._mode = "text"
        return content, deltas

    def _advance(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        """Advance one state transition if the buffer allows; False when more text is needed."""
        if self._mode == "text":
            return self._step_text(content)
        if self._mode == "head":
            m = _HEAD.match(self._buf)
            name = _json_string(m.group(1)) if m else None
            if m and name is not None:
                self._start_call(name, deltas)
                self._body += self._buf[: m.end()]
                self._buf = self._buf[m.end():]
                self._mode = "args"
                return True
            return self._close_whole(deltas, content)
        if self._mode == "args":
            return self._step_args(deltas)
        if self._mode == "tail":  # after the arguments: skip `}` and wait for the closing tag
            i = self._buf.find(TOOL_CLOSE)
            if i < 0:
                self._buf = self._buf[len(self._buf) - partial_suffix_len(self._buf, [TOOL_CLOSE]):]
                return False
            self._buf = self._buf[i + len(TOOL_CLOSE):]
            self._mode, self._strip_next = "text", True
            return True
        return self._close_whole(deltas, content)  # whole: wait for the closing tag

    def _step_text(self, content: list[str]) -> bool:
        self._skip_space_after_call()
        i = self._buf.find(TOOL_OPEN)
        if i >= 0:
            before = self._buf[:i].rstrip()
            self._ws_before = self._buf[len(before):i]  # given back if the body is no call
            content.append(before)
            self._buf = self._buf[i + len(TOOL_OPEN):]
            self._body = ""
            self._mode = "head"
            return True
        self._release_text(content, [TOOL_OPEN])
        return False

    def _step_args(self, deltas: list[ToolCallDelta]) -> bool:
        if self._scan.depth == 0:  # before the value: skip whitespace, then it must open { or [
            stripped = self._buf.lstrip()
            if not stripped:
                self._body += self._buf
                self._buf = ""
                return False
            if stripped[0] not in "{[":  # e.g. arguments as a JSON string: parse it whole
                self._mode = "whole"
                return True
            self._body += self._buf[: len(self._buf) - len(stripped)]
            self._buf = stripped
        n = self._scan.feed(self._buf)
        piece, self._buf = self._buf[:n], self._buf[n:]
        self._body += piece
        call = self.calls[-1]
        call.arguments += piece
        if piece:
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=piece))
        if self._scan.depth == 0:
            call.complete = True
            self._mode = "tail"
            return True
        return False

    def _close_whole(self, deltas: list[ToolCallDelta], content: list[str]) -> bool:
        i = self._buf.find(TOOL_CLOSE)
        if i < 0:
            return False
        body = self._body + self._buf[:i]
        self._buf = self._buf[i + len(TOOL_CLOSE):]
        text = self._parse_whole(body, deltas)
        content.append(text + TOOL_CLOSE if text else "")
        self._mode, self._strip_next = "text", not text
        return True

    def _parse_whole(self, body: str, deltas: list[ToolCallDelta]) -> str:
        """Finish a call from its whole body; returns text to emit as content if it is no call."""
        started = self._mode in ("whole", "args")  # (id, name) already went out
        parsed = parse_call_body(body)
        if parsed is None:
            if started:  # a started call whose arguments never became JSON: keep it, incomplete
                return ""
            self.invalid_bodies.append(body)
            return self._ws_before + TOOL_OPEN + body
        name, arguments = parsed
        if not started:
            self._start_call(name, deltas)
        call = self.calls[-1]
        call.arguments, call.complete = arguments, True
        deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=arguments))
        return ""

    def _start_call(self, name: str, deltas: list[ToolCallDelta]) -> None:
        self.calls.append(ToolCall(f"{self._id_prefix}{uuid.uuid4().hex[:24]}", name, ""))
        self._scan = _JsonScan()
        deltas.append(ToolCallDelta(len(self.calls) - 1, self.calls[-1].id, name, ""))


def parse_tool_calls(text: str, id_prefix: str = "call_") -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole model output; the same code path as streaming."""
    stream = ToolCallStream(id_prefix)
    c1, _ = stream.feed(text)
    c2, _ = stream.finish()
    return c1 + c2, stream.calls
