"""DeepSeek tool calls, streamed: the same feed/finish interface as tool_parser.ToolCallStream.

DeepSeek V3 / R1 write::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

and V3.1 drops the type and the fence: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``.
Both are read. A call goes out once its end tag arrived: id and name, then its whole arguments
as one fragment (simpler than scanning two body forms as they stream; OpenAI clients accept
either). Text before the block is content; a call body that is not a call comes back as
content, tags included, so nothing the model wrote is lost. A forced tool_choice prefills the
call's head in this same syntax (deepseek_chat.forced_prefill), so this parser reads it too.
Reasoning (``<think>...</think>``) is split earlier by reasoning.ReasoningStream, as for Qwen.
"""
from __future__ import annotations

import json
import re
import uuid

from .tool_parser import CallStream, ToolCall, ToolCallDelta, ToolCallStream

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)


def parse_deepseek_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of the text between CALL_BEGIN and CALL_END; None if no call."""
    head, sep, rest = body.partition(SEP)
    if not sep:
        return None
    fence = _FENCE.search(rest)
    if fence is not None:  # V3 / R1: TYPE<sep>NAME\n```json\nARGS\n```
        name, args = rest[: fence.start()].strip(), fence.group(1)
    else:  # V3.1: NAME<sep>ARGS
        name, args = head.strip(), rest.strip()
    try:
        obj = json.loads(args)
    except ValueError:
        return None
    if not name or not isinstance(obj, dict):
        return None
    return name, args


class DeepSeekToolStream(CallStream):
    """feed(text) -> (content, deltas); finish() -> the same for whatever was held back."""

    def __init__(self, id_prefix: str = "call_") -> None:
        super().__init__()
        self._id_prefix = id_prefix
        self._in_block = False  # inside <｜tool▁calls▁begin｜> ... <｜tool▁calls▁end｜>

    def _advance(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        return self._step_block(content, deltas) if self._in_block else self._step_text(content)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self.feed("")
        rest, self._buf = self._buf, ""
        if self._in_block:  # stopped inside the block (EOS before the end tags)
            body = rest.strip()
            if body.startswith(CALL_BEGIN):
                body = body[len(CALL_BEGIN):]
            if body and not self._emit_call(body, deltas):
                content += CALL_BEGIN + body
        else:
            content += rest
        self._in_block = False
        return content, deltas

    def _step_text(self, content: list[str]) -> bool:
        self._skip_space_after_call()
        starts = [i for i in (self._buf.find(CALLS_BEGIN), self._buf.find(CALL_BEGIN)) if i >= 0]
        if starts:  # a block, or a lone call without the outer tag
            i = min(starts)
            content.append(self._buf[:i].rstrip())
            tag = CALLS_BEGIN if self._buf.startswith(CALLS_BEGIN, i) else ""
            self._buf = self._buf[i + len(tag):]
            self._in_block = True
            return True
        self._release_text(content, [CALLS_BEGIN, CALL_BEGIN])
        return False

    def _step_block(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        stripped = self._buf.lstrip()
        if stripped.startswith(CALLS_END):
            self._buf = stripped[len(CALLS_END):]
            self._in_block, self._strip_next = False, True
            return True
        if not stripped.startswith(CALL_BEGIN):
            if stripped and not any(t.startswith(stripped[: len(t)]) for t in (CALL_BEGIN, CALLS_END)):
                self._in_block = False  # text that is neither a call nor the end: back to content
                self._buf = stripped
                return True
            return False
        end = stripped.find(CALL_END)
        if end < 0:
            return False
        body = stripped[len(CALL_BEGIN): end]
        self._buf = stripped[end + len(CALL_END):]
        if not self._emit_call(body, deltas):
            content.append(CALL_BEGIN + body + CALL_END)
        return True

    def _emit_call(self, body: str, deltas: list[ToolCallDelta]) -> bool:
        parsed = parse_deepseek_call(body)
        if parsed is None:
            self.invalid_bodies.append(body)
            return False
        name, arguments = parsed
        call = ToolCall(f"{self._id_prefix}{uuid.uuid4().hex[:24]}", name, arguments, complete=True)
        self.calls.append(call)
        index = len(self.calls) - 1
        deltas.append(ToolCallDelta(index, call.id, name, ""))
        deltas.append(ToolCallDelta(index, arguments=arguments))
        return True


def uses_deepseek_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and CALLS_BEGIN in chat_template


def make_tool_stream(chat_template: str | None, id_prefix: str) -> ToolCallStream | DeepSeekToolStream:
    """DeepSeek's parser when the model's chat template writes DeepSeek tool calls, else Hermes."""
    return DeepSeekToolStream(id_prefix) if uses_deepseek_tools(chat_template) else ToolCallStream(id_prefix)


def parse_deepseek_tool_calls(text: str, id_prefix: str = "call_") -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole model output; the same code path as streaming."""
    stream = DeepSeekToolStream(id_prefix)
    c1, _ = stream.feed(text)
    c2, _ = stream.finish()
    return c1 + c2, stream.calls
