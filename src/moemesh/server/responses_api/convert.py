"""Responses API input -> the internal chat shape (OpenAI-chat-like messages, tools, tool_choice).

Items, in order: messages (``{"role", "content"}``, ``type: "message"`` optional; content a string
or input_text / output_text parts), ``function_call`` (a call the model made earlier, sent back),
``function_call_output`` (its result), ``reasoning`` (earlier reasoning: its text is kept with the
assistant turn). An assistant message followed by function calls is one assistant turn, as the
model wrote it. Anything else gets a 400 naming the item."""
from __future__ import annotations

from typing import Any

from ..common.errors import APIError, function_tool_only
from .schemas import FunctionChoice, ResponsesRequest

_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_ROLES = ("user", "assistant", "system", "developer")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"{where} must be a string", param=where)
    return value


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise APIError(400, f"{where}[{j}]: content part type {kind!r} is not supported (text parts only)",
                           param=f"{where}[{j}].type")
        texts.append(_str(part.get("text"), f"{where}[{j}].text"))
    return "\n".join(texts)


def _output_text(output: Any, where: str) -> str:
    """A function_call_output's output: a string, or a list of text parts."""
    return output if isinstance(output, str) else _content_text(output, where)


class _Turns:
    """Builds the message list; consecutive assistant pieces (text, reasoning, calls) make one turn."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def _assistant(self) -> dict[str, Any]:
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant" or last.get("_closed"):
            last = {"role": "assistant", "content": ""}
            self.messages.append(last)
        return last

    def add(self, role: str, text: str) -> None:
        if role != "assistant":
            self.messages.append({"role": role, "content": text})
            return
        turn = self._assistant()
        if turn.get("tool_calls"):  # text after a call is a new turn
            turn["_closed"] = True
            turn = self._assistant()
        turn["content"] = f"{turn['content']}\n{text}" if turn["content"] else text

    def reasoning(self, text: str) -> None:
        turn = self._assistant()
        turn["reasoning_content"] = f"{turn.get('reasoning_content', '')}{text}"

    def call(self, call_id: str, name: str, arguments: str) -> None:
        self._assistant().setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})

    def result(self, call_id: str, text: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def done(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in m.items() if k != "_closed"} for m in self.messages]


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    turns = _Turns()
    if body.instructions:
        turns.add("system", body.instructions)
    if isinstance(body.input, str):
        turns.add("user", body.input)
        return turns.done()
    for i, item in enumerate(body.input):
        at = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise APIError(400, f"{at}.role must be one of {', '.join(_ROLES)} (got {role!r})", param=f"{at}.role")
            turns.add(role, _content_text(item.get("content"), f"{at}.content"))
        elif kind == "function_call":
            arguments = _str(item.get("arguments", "{}"), f"{at}.arguments")
            turns.call(_str(item.get("call_id"), f"{at}.call_id"), _str(item.get("name"), f"{at}.name"), arguments)
        elif kind == "function_call_output":
            turns.result(_str(item.get("call_id"), f"{at}.call_id"), _output_text(item.get("output"), f"{at}.output"))
        elif kind == "reasoning":
            parts = item.get("content") or []
            turns.reasoning(_content_text(parts, f"{at}.content") if parts else "")
        else:
            raise APIError(400, f"{at}: input item type {kind!r} is not supported (message, function_call, "
                           "function_call_output, reasoning)", param=f"{at}.type")
    messages = turns.done()
    if not messages:
        raise APIError(400, "input has no items", param="input")
    return messages


def chat_tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    """Responses tools are flat (``{"type": "function", "name", "parameters"}``); chat's nest them
    under ``function``: the same dict the chat route makes, so the prompt is the same too."""
    if not body.tools:
        return None
    out = []
    for i, tool in enumerate(body.tools):
        function_tool_only(i, tool.type)
        if not tool.name:
            raise APIError(400, f"tools[{i}] needs a name", param=f"tools[{i}].name")
        fn = {"name": tool.name, "description": tool.description, "parameters": tool.parameters, "strict": tool.strict}
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def chat_tool_choice(choice: str | FunctionChoice | None) -> str | dict | None:
    return {"name": choice.name} if isinstance(choice, FunctionChoice) else choice

