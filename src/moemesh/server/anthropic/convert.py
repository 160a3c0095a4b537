"""Anthropic requests -> the internal chat shape (OpenAI-like messages, tools, tool_choice)."""
from __future__ import annotations

import json
from typing import Any

from ..common.errors import APIError
from ..core.images import ImagePolicy, anthropic_block
from .schemas import AnthropicToolChoice, CountTokensRequest


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"{where} must be a string", param=where)
    return value


def _blocks_text(blocks: str | list[dict[str, Any]], where: str) -> str:
    """Text of a system prompt or tool result: a string or a list of text blocks."""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise APIError(400, f"{where}[{j}]: only text blocks are supported here (got {kind!r})",
                           param=f"{where}[{j}].type")
        parts.append(_text(block.get("text"), f"{where}[{j}].text"))
    return "\n".join(parts)


def _message(role: str, blocks: list[dict[str, Any]], where: str, images: ImagePolicy) -> list[dict[str, Any]]:
    """One Anthropic message -> internal messages (tool results become their own tool messages; a
    user message with images keeps its text and image parts in order)."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    parts: list[dict[str, Any]] = []  # text and image parts, when the message has images
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text(block.get("text"), f"{at}.text"))
            parts.append({"type": "text", "text": texts[-1]})
        elif kind == "image" and role == "user":
            parts.append(anthropic_block(block, images, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": _text(block.get("id"), f"{at}.id"), "type": "function",
                          "function": {"name": _text(block.get("name"), f"{at}.name"),
                                       "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            result = _blocks_text(block.get("content", ""), f"{at}.content")
            if block.get("is_error"):
                result = f"Error: {result}"
            out.append({"role": "tool", "tool_call_id": _text(block.get("tool_use_id"), f"{at}.tool_use_id"),
                        "content": result})
        elif kind == "thinking" and role == "assistant":
            reasoning.append(_text(block.get("thinking", ""), f"{at}.thinking"))
        elif kind == "redacted_thinking":
            continue  # opaque to us
        else:
            raise APIError(400, f"{at}: content block type {kind!r} is not supported in a {role} message",
                           param=f"{at}.type")
    if len(parts) > len(texts):  # images: the parts in order (tool results, if any, came first)
        out.append({"role": role, "content": parts})
    elif texts or calls or reasoning:
        msg: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        if reasoning:
            msg["reasoning_content"] = "\n".join(reasoning)
        out.append(msg)
    return out


def chat_messages(body: CountTokensRequest, images: ImagePolicy) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _blocks_text(body.system, "system")})
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        else:
            out += _message(m.role, m.content, f"messages[{i}].content", images)
    return out


def chat_tools(body: CountTokensRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}} for t in body.tools]


def chat_tool_choice(choice: AnthropicToolChoice | None) -> str | dict | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice of type 'tool' needs a name", param="tool_choice.name")
        return {"name": choice.name}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]
