"""Chat messages + tools + tool_choice -> the prompt text, and what the model is steered to write.

Templates differ in what they understand, so messages are shaped to the template: one that
knows ``tools`` gets them as a variable; one that does not (SmolLM2's) gets the Hermes tool
prompt in its system message, and past tool calls / tool results are written into the text in
the same Hermes format. ``tool_choice`` is enforced, not advisory: ``none`` drops the tools,
``required`` and a named function prefill the start of a call after the generation prompt, in
the model's own syntax (Hermes ``<tool_call>``, Harmony's commentary header, DeepSeek's call
block), so the model can only continue the call. A checkpoint without a chat template whose
vocabulary is gpt-oss's or DeepSeek's is rendered by harmony.py / deepseek_chat.py instead.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ...errors import MoemeshError
from ..chat import ChatTemplateError
from ..tokenizer import Tokenizer
from . import deepseek_chat, harmony, tool_formats
from .reasoning import THINK_CLOSE, THINK_OPEN
from .tool_parser import TOOL_CLOSE, TOOL_OPEN

_HERMES_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class PromptError(MoemeshError):
    """The conversation cannot be rendered as asked; ``param`` names the request field at fault
    (the server answers it as HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolMode:
    """How tool calls are read from the output: offered (auto), or forced (required, named)."""

    kind: str  # auto | required | named
    names: frozenset[str]  # the tools offered
    name: str | None = None  # the one tool a named choice demands
    tools: tuple = ()  # the offered tools' definitions (XML-style formats type arguments by their schemas)

    @property
    def forced(self) -> bool:
        return self.kind in ("required", "named")


@dataclass(frozen=True)
class TemplateCaps:
    """What a chat template reads, judged from its source."""

    tools: bool
    tool_calls: bool
    tool_role: bool
    reasoning_content: bool

    @classmethod
    def of(cls, source: str | None) -> TemplateCaps:
        s = source or ""
        return cls("tools" in s, "tool_calls" in s, "'tool'" in s or '"tool"' in s, "reasoning_content" in s)


@dataclass
class PromptPlan:
    text: str  # the rendered prompt, prefill included
    prefill: str  # the tail of text that the parsers must read as the model's own output
    tool_mode: ToolMode | None
    start_in_reasoning: bool


def content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = "image parts are only taken in user messages" if kind == "image" else (
                f"only text content parts are supported (got type {kind!r})")
            raise PromptError(f"{where}[{j}]: {what}", param=f"{where}[{j}].type")
        texts.append(part["text"])
    return "\n".join(texts)


def has_images(content: Any) -> bool:
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content)


def content_with_images(content: list, where: str) -> list[dict]:
    """A user message's parts for a vision template: text parts and bare ``{"type": "image"}`` parts
    in their order (the template writes each image's placeholder; the image itself travels apart)."""
    out: list[dict] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") == "image":
            out.append({"type": "image"})
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        else:
            kind = part.get("type") if isinstance(part, dict) else None
            raise PromptError(f"{where}[{j}]: content part type {kind!r} is not supported (text or image)",
                              param=f"{where}[{j}].type")
    return out


def _arguments_value(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _hermes_call(call: dict) -> str:
    fn = call.get("function", {})
    body = json.dumps({"name": fn.get("name"), "arguments": _arguments_value(fn.get("arguments", {}))},
                      ensure_ascii=False)
    return f"{TOOL_OPEN}\n{body}\n{TOOL_CLOSE}"


def shape_messages(messages: list[dict], caps: TemplateCaps) -> list[dict]:
    """Internal messages -> what this template can render (strings for content, always)."""
    out: list[dict] = []
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "user" and has_images(msg.get("content")):
            out.append({"role": role, "content": content_with_images(msg["content"], f"messages[{i}].content")})
            continue
        text = content_text(msg.get("content"), f"messages[{i}].content")
        if role == "developer":
            role = "system"
        if role in ("tool", "function"):
            if caps.tool_role:
                out.append({"role": "tool", "content": text, "tool_call_id": msg.get("tool_call_id"),
                            "name": msg.get("name")})
                continue
            response = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):  # consecutive results share one user turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_responses": True})
            continue
        shaped: dict[str, Any] = {"role": role, "content": text}
        if role == "assistant":
            calls = msg.get("tool_calls") or []
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            if reasoning and caps.reasoning_content:
                shaped["reasoning_content"] = reasoning
            if calls and caps.tool_calls:
                shaped["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _arguments_value(c["function"].get("arguments"))}}
                    for c in calls
                ]
            elif calls:
                shaped["content"] = "\n".join([text] * bool(text) + [_hermes_call(c) for c in calls])
        out.append(shaped)
    return [{k: v for k, v in m.items() if k != "_tool_responses"} for m in out]


def _with_tool_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    block = _HERMES_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{block}" if first["content"] else block
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def tool_mode_for(tools: list[dict] | None, choice: str | dict | None) -> ToolMode | None:
    """tool_choice ('none' | 'auto' | 'required' | {'name': X}) -> ToolMode, or None for no tools."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise PromptError("tool_choice needs tools", param="tool_choice")
        return None
    names = frozenset(t["function"]["name"] for t in tools)
    if choice is None or choice == "auto":
        return ToolMode("auto", names)
    if choice == "none":
        return None
    if choice == "required":
        return ToolMode("required", names, next(iter(names)) if len(names) == 1 else None)
    if isinstance(choice, dict) and choice.get("name") in names:
        return ToolMode("named", names, choice["name"])
    wanted = choice.get("name") if isinstance(choice, dict) else choice
    raise PromptError(f"tool_choice names {wanted!r}, which is not among the tools ({', '.join(sorted(names))})",
                   param="tool_choice")


_BUILTIN_CAPS = TemplateCaps(tools=True, tool_calls=True, tool_role=True, reasoning_content=True)


def _render_builtin(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None,
                    template_kwargs: dict) -> str | None:
    """The prompt of a checkpoint without a chat template whose format we know (gpt-oss's Harmony,
    DeepSeek's), judged from its vocabulary; None when there is none to render."""
    shaped = shape_messages(messages, _BUILTIN_CAPS)
    if harmony.uses_builtin_harmony(tokenizer):
        effort = template_kwargs.get("reasoning_effort", "medium")
        if effort not in ("low", "medium", "high"):
            raise PromptError(f"reasoning_effort must be low, medium or high (got {effort!r})",
                           param="chat_template_kwargs.reasoning_effort")
        return harmony.render(shaped, tools, reasoning_effort=effort)
    if deepseek_chat.uses_deepseek(tokenizer):
        bos = tokenizer.decode([tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None else ""
        return deepseek_chat.render(shaped, tools, bos=bos)
    return None


def _forced_prefill(tokenizer: Tokenizer, mode: ToolMode) -> str:
    """The head of a call in the model's own syntax, which the model can only continue."""
    if fmt := tool_formats.format_of(tokenizer.chat_template):  # GLM, MiniMax, Kimi
        return tool_formats.forced_prefill(fmt, mode.name)
    if harmony.is_harmony(tokenizer):
        return harmony.forced_prefill(mode.name)  # gpt-oss: the commentary header addressed to the function
    if deepseek_chat.writes_deepseek_tools(tokenizer):
        return deepseek_chat.forced_prefill(mode.name)
    return f"{TOOL_OPEN}\n" + ('{"name": ' + json.dumps(mode.name, ensure_ascii=False) + ', "arguments": '
                              if mode.name else '{"name": "')


# what the server itself passes to the template; chat_template_kwargs may not set them
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt")


def build_chat_prompt(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None,
                      tool_choice: str | dict | None, template_kwargs: dict | None = None,
                      structured: bool = False) -> PromptPlan:
    """structured: the answer follows a grammar (response_format), which starts at the first token,
    so a <think> block the template opened is closed first, as for a forced call."""
    for key in RESERVED_TEMPLATE_KWARGS:
        if key in (template_kwargs or {}):
            raise PromptError(f"chat_template_kwargs may not set {key!r}: the server sets it from the request",
                           param=f"chat_template_kwargs.{key}")
    mode = tool_mode_for(tools, tool_choice)
    if mode is not None:
        mode = dataclasses.replace(mode, tools=tuple(tools or ()))
    offered = tools if mode is not None else None  # tool_choice none: the model never sees them
    text = None if tokenizer.chat_template else _render_builtin(tokenizer, messages, offered, template_kwargs or {})
    if text is None:
        caps = TemplateCaps.of(tokenizer.chat_template)
        shaped = shape_messages(messages, caps)
        if offered and not caps.tools:
            shaped = _with_tool_prompt(shaped, offered)
        try:
            text = tokenizer.apply_chat_template(shaped, add_generation_prompt=True,
                                                 tools=offered if caps.tools else None, **(template_kwargs or {}))
        except ChatTemplateError as exc:
            raise PromptError(str(exc), param="messages") from None
    start_in_reasoning = text.rstrip().endswith(THINK_OPEN)
    prefill = _forced_prefill(tokenizer, mode) if mode is not None and mode.forced else ""
    if (prefill or structured) and start_in_reasoning:  # the template opened <think>: the call / JSON comes after it
        text += f"{THINK_CLOSE}\n\n"
    return PromptPlan(text + prefill, prefill, mode, start_in_reasoning and not prefill and not structured)
