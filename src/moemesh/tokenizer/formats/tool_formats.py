"""Tool calls of the newer families, streamed: GLM-4.5/4.6/4.7's XML-style calls, MiniMax-M2's
``<invoke>`` blocks and Kimi K2 / K2.5's sectioned calls; ``make_tool_stream`` picks the parser a
model's chat template implies (these, DeepSeek's, or Hermes ``<tool_call>{json}``).

The formats (what the models write, per their chat templates)::

    GLM:     <tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Paris</arg_value>\\n</tool_call>
             (4.7 drops the newlines); one block per call
    MiniMax: <minimax:tool_call>\\n<invoke name="get_weather">\\n<parameter name="city">Paris</parameter>
             \\n</invoke>\\n</minimax:tool_call>; several invokes per block
    Kimi:    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
             <|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

GLM and MiniMax write each argument's value as text: a parameter the tool's schema types as a
string stays text, others are read as JSON (numbers, booleans, objects), falling back to text.
Kimi's call id (``functions.NAME:N``) is kept as the OpenAI call id: its template writes tool
results under that id. Like the DeepSeek parser, a call goes out whole once its block closed; a
block that holds no valid call comes back as content, tags included.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from .tool_parser import CallStream, ToolCall, ToolCallDelta

GLM_OPEN, GLM_CLOSE, GLM_KEY = "<tool_call>", "</tool_call>", "<arg_key>"
MINIMAX_OPEN, MINIMAX_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"
KIMI_OPEN, KIMI_CLOSE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL, KIMI_ARGS, KIMI_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
_MM_INVOKE = re.compile(r'<invoke\s+name="([^"]+)"\s*>(.*?)</invoke>', re.S)
_MM_PARAM = re.compile(r'<parameter\s+name="([^"]+)"\s*>(.*?)</parameter>', re.S)
_KIMI_CALL = re.compile(re.escape(KIMI_CALL) + r"\s*(.*?)\s*" + re.escape(KIMI_ARGS) + r"(.*?)" + re.escape(KIMI_END), re.S)

Parsed = list[tuple[str, str, str | None]]  # (name, arguments JSON, the model's own call id or None)


def param_types(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, str]]:
    """tool name -> parameter -> JSON schema type (from the request's tools)."""
    out: dict[str, dict[str, str]] = {}
    for t in tools or []:
        fn = t.get("function", t)
        props = ((fn.get("parameters") or {}).get("properties")) or {}
        out[str(fn.get("name"))] = {k: str(v.get("type", "")) for k, v in props.items() if isinstance(v, dict)}
    return out


def _value(text: str, kind: str) -> Any:
    """A parameter's value as written: text for string parameters, else JSON when it reads as JSON."""
    if kind == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _arguments(name: str, pairs: list[tuple[str, str]], types: dict[str, dict[str, str]]) -> str:
    kinds = types.get(name, {})
    return json.dumps({k.strip(): _value(v.strip("\n"), kinds.get(k.strip(), "")) for k, v in pairs}, ensure_ascii=False)


def parse_glm(body: str, types: dict[str, dict[str, str]]) -> Parsed | None:
    """Between <tool_call> and </tool_call>: NAME then <arg_key>/<arg_value> pairs."""
    key = body.find(GLM_KEY)
    name = (body if key < 0 else body[:key]).strip()
    rest = "" if key < 0 else body[key:]
    pairs = _GLM_ARG.findall(rest)
    if not name or "<" in name or "\n" in name or len(_GLM_ARG.sub("", rest).strip()):
        return None
    return [(name, _arguments(name, pairs, types), None)]


def parse_minimax(body: str, types: dict[str, dict[str, str]]) -> Parsed | None:
    calls = [(name, _arguments(name, _MM_PARAM.findall(inner), types), None) for name, inner in _MM_INVOKE.findall(body)]
    return calls or None


def parse_kimi(body: str, types: dict[str, dict[str, str]]) -> Parsed | None:
    calls: Parsed = []
    for call_id, args in _KIMI_CALL.findall(body):
        m = re.fullmatch(r"(?:functions\.)?([^:\s]+)(?::\d+)?", call_id)
        try:
            ok = m is not None and isinstance(json.loads(args), dict)
        except ValueError:
            ok = False
        if not ok:
            return None
        calls.append((m.group(1), args.strip(), call_id))
    return calls or None


class BlockToolStream(CallStream):
    """feed(text) -> (content, deltas); finish() -> the same for whatever was held back. Text
    between ``open`` and ``close`` is one block, parsed whole by ``parse`` into calls."""

    def __init__(self, open_tag: str, close_tag: str, parse: Callable[[str, dict], Parsed | None],
                 id_prefix: str = "call_", tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._open, self._close, self._parse = open_tag, close_tag, parse
        self._id_prefix, self._types = id_prefix, param_types(tools)
        self._in_block = False

    def _advance(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        return self._step_block(content, deltas) if self._in_block else self._step_text(content)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self.feed("")
        rest, self._buf = self._buf, ""
        if self._in_block and rest.strip():  # stopped inside a block (EOS before its close)
            if not self._emit(rest, deltas):
                content += self._open + rest
        elif not self._in_block:
            content += rest
        self._in_block = False
        return content, deltas

    def _step_text(self, content: list[str]) -> bool:
        self._skip_space_after_call()
        i = self._buf.find(self._open)
        if i >= 0:
            content.append(self._buf[:i].rstrip())
            self._buf, self._in_block = self._buf[i + len(self._open):], True
            return True
        self._release_text(content, [self._open])
        return False

    def _step_block(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        end = self._buf.find(self._close)
        if end < 0:
            return False
        body, self._buf = self._buf[:end], self._buf[end + len(self._close):]
        if not self._emit(body, deltas):
            content.append(self._open + body + self._close)
        self._in_block, self._strip_next = False, True
        return True

    def _emit(self, body: str, deltas: list[ToolCallDelta]) -> bool:
        parsed = self._parse(body, self._types)
        if parsed is None:
            self.invalid_bodies.append(body)
            return False
        for name, arguments, own_id in parsed:
            call = ToolCall(own_id or f"{self._id_prefix}{uuid.uuid4().hex[:24]}", name, arguments, complete=True)
            self.calls.append(call)
            deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, name, ""))
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=arguments))
        return True


FORMATS: dict[str, tuple[str, str, Callable[[str, dict], Parsed | None]]] = {
    "glm": (GLM_OPEN, GLM_CLOSE, parse_glm),
    "minimax": (MINIMAX_OPEN, MINIMAX_CLOSE, parse_minimax),
    "kimi": (KIMI_OPEN, KIMI_CLOSE, parse_kimi),
}


def format_of(chat_template: str | None) -> str | None:
    """Which of these formats a chat template writes, or None (DeepSeek's, Hermes)."""
    if not chat_template:
        return None
    if MINIMAX_OPEN in chat_template:
        return "minimax"
    if KIMI_OPEN in chat_template:
        return "kimi"
    if GLM_KEY in chat_template and GLM_OPEN in chat_template:
        return "glm"
    return None


def make_stream(fmt: str, id_prefix: str = "call_", tools: list[dict[str, Any]] | None = None) -> BlockToolStream:
    open_tag, close_tag, parse = FORMATS[fmt]
    return BlockToolStream(open_tag, close_tag, parse, id_prefix, tools)


def forced_prefill(fmt: str, name: str | None) -> str:
    """The head of a forced call (tool_choice named, or required with one tool) in the format's syntax."""
    if fmt == "glm":
        return GLM_OPEN + (f"{name}\n" if name else "")
    if fmt == "minimax":
        return f"{MINIMAX_OPEN}\n" + (f'<invoke name="{name}">\n' if name else "<invoke name=\"")
    return KIMI_OPEN + KIMI_CALL + (f"functions.{name}:" if name else "functions.")


def parse_tool_calls(fmt: str, text: str, tools: list[dict[str, Any]] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole model output; the same code path as streaming."""
    stream = make_stream(fmt, tools=tools)
    c1, _ = stream.feed(text)
    c2, _ = stream.finish()
    return c1 + c2, stream.calls


MARKERS = {
    "glm": [GLM_OPEN, GLM_CLOSE, GLM_KEY, "</arg_key>", "<arg_value>", "</arg_value>"],
    "minimax": [MINIMAX_OPEN, MINIMAX_CLOSE],
    "kimi": [KIMI_OPEN, KIMI_CLOSE, KIMI_CALL, KIMI_ARGS, KIMI_END],
}


class KeepMarkers:
    """A decoder that skips special tokens except the format's markers: releases mark some of them
    special (Kimi's section tokens), and the parser must still see them."""

    def __init__(self, tokenizer: Any, fmt: str) -> None:
        self._tok = tokenizer
        self._keep = {i: m for m in MARKERS[fmt] if (i := tokenizer.token_to_id(m)) is not None}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if not skip_special_tokens or not self._keep:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        out, run = [], []
        for i in ids:
            if i in self._keep:
                out += [self._tok.decode(run, skip_special_tokens=True), self._keep[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._tok.decode(run, skip_special_tokens=True)
