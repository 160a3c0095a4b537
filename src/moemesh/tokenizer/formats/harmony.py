"""OpenAI's Harmony chat format (gpt-oss): render messages, parse the model's output channels.

A message is ``<|start|>{role}[ to={recipient}]<|channel|>{channel}[ <|constrain|>json]<|message|>
{text}<|end|>``; the assistant ends a turn with ``<|return|>`` (final answer) or ``<|call|>`` (tool
call). Channels: ``analysis`` (chain of thought -> reasoning), ``commentary`` (tool calls, addressed
``to=functions.NAME``, and user-visible preambles -> content), ``final`` (the answer -> content).
Tools are declared to the model as a TypeScript-like ``namespace functions``.

``HarmonyStream`` has the same feed/finish shape as the other tool parsers; it needs the text
with special tokens kept (the detokenizer must not skip them for this format).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .holdback import partial_suffix_len
from .tool_parser import ToolCall, ToolCallDelta

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
BODY_ENDS = (END, CALL, RETURN)
SYSTEM_PREAMBLE = "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06"


# -- rendering ------------------------------------------------------------------------------------
def _ts_type(schema: dict[str, Any]) -> str:
    """A JSON schema as the TypeScript-like type Harmony shows the model."""
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_ts_type({**schema, "type": k}) for k in kind)
    if kind == "array":
        return f"{_ts_type(schema.get('items') or {})}[]"
    if kind == "object" and schema.get("properties"):
        return "{\n" + _ts_fields(schema) + "}"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean",
            "null": "null", "object": "object"}.get(kind or "", "any")


def _ts_fields(schema: dict[str, Any]) -> str:
    required = set(schema.get("required") or [])
    lines = []
    for name, prop in (schema.get("properties") or {}).items():
        if prop.get("description"):
            lines.append(f"// {prop['description']}\n")
        default = f" // default: {prop['default']}" if "default" in prop else ""
        lines.append(f"{name}{'' if name in required else '?'}: {_ts_type(prop)},{default}\n")
    return "".join(lines)


def render_tools(tools: list[dict[str, Any]]) -> str:
    """OpenAI ``tools`` (type function) -> the ``namespace functions`` block."""
    out = ["## functions\n\nnamespace functions {\n\n"]
    for tool in tools:
        fn = tool.get("function", tool)
        if fn.get("description"):
            out.append(f"// {fn['description']}\n")
        params = fn.get("parameters") or {}
        args = f"(_: {{\n{_ts_fields(params)}}})" if params.get("properties") else "()"
        out.append(f"type {fn['name']} = {args} => any;\n\n")
    out.append("} // namespace functions")
    return "".join(out)


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
           reasoning_effort: str = "medium", add_generation_prompt: bool = True) -> str:
    """OpenAI-style chat messages -> a Harmony prompt (ending ``<|start|>assistant`` to generate).
    System messages become the developer's instructions; earlier turns' analysis is dropped."""
    system = f"{SYSTEM_PREAMBLE}\n\nReasoning: {reasoning_effort}\n\n# Valid channels: analysis, commentary, final. " \
             "Channel must be included for every message."
    if tools:
        system += "\nCalls to these tools must go to the commentary channel: 'functions'."
    out = [f"{START}system{MESSAGE}{system}{END}"]
    instructions = "\n".join(_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    if instructions or tools:
        dev = f"# Instructions\n\n{instructions}" if instructions else ""
        if tools:
            dev += ("\n\n" if dev else "") + "# Tools\n\n" + render_tools(tools)
        out.append(f"{START}developer{MESSAGE}{dev}{END}")
    names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "user":
            out.append(f"{START}user{MESSAGE}{_text_of(m.get('content'))}{END}")
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if reasoning and calls and i > last_user:  # this turn's chain of thought that led to the call
                out.append(f"{START}assistant{CHANNEL}analysis{MESSAGE}{reasoning}{END}")
            if _text_of(m.get("content")):  # beside a call it was a preamble (commentary), else the answer
                channel = "commentary" if calls else "final"
                out.append(f"{START}assistant{CHANNEL}{channel}{MESSAGE}{_text_of(m.get('content'))}{END}")
            for call in calls:
                fn = call["function"]
                names[call.get("id", "")] = fn["name"]
                args = fn.get("arguments") or "{}"
                args = args if isinstance(args, str) else json.dumps(args)
                out.append(f"{START}assistant to=functions.{fn['name']}{CHANNEL}commentary json{MESSAGE}{args}{CALL}")
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""), "tool")
            out.append(f"{START}functions.{name} to=assistant{CHANNEL}commentary{MESSAGE}{_text_of(m.get('content'))}{END}")
    if add_generation_prompt:
        out.append(f"{START}assistant")
    return "".join(out)


# -- parsing --------------------------------------------------------------------------------------
_RECIPIENT = re.compile(r"to=(\S+?)(?=<\||\s|$)")


class HarmonyStream:
    """feed(text) -> (reasoning, content, tool-call deltas); finish() closes an open message.

    Starts in a header (the prompt ends with ``<|start|>assistant``). Bodies are streamed as they
    arrive; partial special tokens are held back.
    """

    def __init__(self, id_prefix: str = "call_") -> None:
        self.id_prefix = id_prefix
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._in_body = False
        self._channel: str | None = None
        self._recipient: str | None = None

    @property
    def complete_calls(self) -> int:
        return sum(c.complete for c in self.calls)

    def feed(self, text: str) -> tuple[str, str, list[ToolCallDelta]]:
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._step(reasoning, content, deltas):
            pass
        return "".join(reasoning), "".join(content), deltas

    def finish(self) -> tuple[str, str, list[ToolCallDelta]]:
        """The engine stopped on <|return|> or <|call|> (not in the text): close the message."""
        reasoning: list[str] = []
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        if self._in_body:
            self._emit(self._buf, reasoning, content, deltas)
            self._close_body()
        self._buf = ""
        return "".join(reasoning), "".join(content), deltas

    def _step(self, reasoning: list[str], content: list[str], deltas: list[ToolCallDelta]) -> bool:
        if not self._in_body:
            i = self._buf.find(MESSAGE)
            if i < 0:
                return False
            header, self._buf = self._buf[:i], self._buf[i + len(MESSAGE):]
            header = header.rsplit(START, 1)[-1]
            m = re.search(re.escape(CHANNEL) + r"(\w+)", header)
            self._channel = m.group(1) if m else None
            r = _RECIPIENT.search(header)
            self._recipient = r.group(1) if r else None
            self._in_body = True
            if self._recipient and self._recipient.startswith("functions."):
                call = ToolCall(f"{self.id_prefix}{uuid.uuid4().hex[:24]}", self._recipient[len("functions."):], "")
                self.calls.append(call)
                deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name))
            return True
        ends = [(self._buf.find(t), t) for t in BODY_ENDS if t in self._buf]
        if ends:
            i, tag = min(ends)
            self._emit(self._buf[:i], reasoning, content, deltas)
            self._buf = self._buf[i + len(tag):]
            self._close_body()
            return True
        keep = partial_suffix_len(self._buf, list(BODY_ENDS))
        self._emit(self._buf[: len(self._buf) - keep], reasoning, content, deltas)
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _emit(self, piece: str, reasoning: list[str], content: list[str], deltas: list[ToolCallDelta]) -> None:
        if not piece:
            return
        if self._recipient and self._recipient.startswith("functions."):
            self.calls[-1].arguments += piece
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=piece))
        elif self._channel == "analysis":
            reasoning.append(piece)
        else:  # final, and commentary preambles meant for the user
            content.append(piece)

    def _close_body(self) -> None:
        if self._recipient and self._recipient.startswith("functions."):
            self.calls[-1].complete = True
        self._in_body, self._channel, self._recipient = False, None, None


def parse(text: str, id_prefix: str = "call_") -> tuple[str, str, list[ToolCall]]:
    """(reasoning, content, tool calls) of a whole model output; the streaming code path."""
    stream = HarmonyStream(id_prefix)
    r1, c1, _ = stream.feed(text)
    r2, c2, _ = stream.finish()
    return r1 + r2, c1 + c2, stream.calls


def uses_harmony(chat_template: str | None) -> bool:
    """The model's chat template writes Harmony (gpt-oss's renders ``<|channel|>``)."""
    return bool(chat_template) and CHANNEL in chat_template


def is_harmony(tokenizer: Any) -> bool:
    """The model speaks Harmony: its template writes it, or it has no template and its vocabulary
    is o200k_harmony's (gpt-oss): ``<|channel|>`` and ``<|message|>`` are tokens."""
    template = tokenizer.chat_template
    if template:
        return uses_harmony(template)
    return all(tokenizer.token_to_id(t) is not None for t in (CHANNEL, MESSAGE))


def uses_builtin_harmony(tokenizer: Any) -> bool:
    """Harmony without a chat template: the prompt is rendered by ``render`` here."""
    return not tokenizer.chat_template and is_harmony(tokenizer)


def stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """Harmony ends the assistant's turn with <|return|> (answer) or <|call|> (tool call);
    <|end|> only closes one message (the analysis before the answer), so it must not stop."""
    ids = set(tokenizer.eos_token_ids)
    ids.discard(tokenizer.token_to_id(END))
    ids |= {i for i in (tokenizer.token_to_id(RETURN), tokenizer.token_to_id(CALL)) if i is not None}
    return frozenset(ids)


def forced_prefill(name: str | None) -> str:
    """What the assistant is made to start with when tool_choice forces a call: the commentary
    header addressed to the named function (or just to ``functions.`` when any will do)."""
    if name is None:
        return f"{CHANNEL}commentary to=functions."
    return f"{CHANNEL}commentary to=functions.{name} {CONSTRAIN}json{MESSAGE}"
