"""DeepSeek's chat format (V2.5 / V3 / R1), rendered in Python for checkpoints that ship no chat
template, and the prefill that forces a tool call in DeepSeek's own tool-call syntax.

The rendering follows DeepSeek-V3-0324's published template: ``BOS{system}`` (system messages
joined by blank lines), ``<｜User｜>{text}<｜Assistant｜>`` (the generation prompt is written with
the user turn), an answer then ``<｜end▁of▁sentence｜>``, past tool calls as::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {ARGS}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>

and tool results as ``<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{text}<｜tool▁output▁end｜>...
<｜tool▁outputs▁end｜>``, after which the model answers without a new ``<｜Assistant｜>`` tag. The
published template does not list the tools; like vLLM's DeepSeek-V3 tool template we describe
them in the system prompt, with the call syntax the model was trained on.
"""
from __future__ import annotations

import json
from typing import Any

from .deepseek_tools import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
EOS = "<｜end▁of▁sentence｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_TAIL = (f"\n</tools>\n\nFor function call returns, you should first print {CALLS_BEGIN}\n"
               "For each function call, you should return object like:\n"
               f"{CALL_BEGIN}function{SEP}<function_name>\n```json\n<function_arguments_in_json_format>\n```{CALL_END}\n"
               f"At the end of function call returns, you should print {CALLS_END}{EOS}")


def uses_deepseek(tokenizer: Any) -> bool:
    """No chat template, and a DeepSeek vocabulary (V2.5 / V3 / R1 have the ``<｜User｜>`` and
    ``<｜Assistant｜>`` tokens): the prompt is rendered here."""
    if tokenizer.chat_template:
        return False
    return all(tokenizer.token_to_id(t) is not None for t in (USER, ASSISTANT, CALLS_BEGIN))


def writes_deepseek_tools(tokenizer: Any) -> bool:
    """The model writes DeepSeek tool calls: its template does, or we render its prompts."""
    template = tokenizer.chat_template
    return CALLS_BEGIN in template if template else uses_deepseek(tokenizer)


def render_tools(tools: list[dict[str, Any]]) -> str:
    return _TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + _TOOLS_TAIL


def _arguments(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args if args is not None else {}, ensure_ascii=False)


def _call(call: dict[str, Any]) -> str:
    fn = call["function"]
    return (f"{CALL_BEGIN}{call.get('type') or 'function'}{SEP}{fn['name']}\n```json\n"
            f"{_arguments(fn.get('arguments'))}\n```{CALL_END}")


def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, bos: str = "",
           add_generation_prompt: bool = True) -> str:
    """Messages with string contents (chat_prompt.shape_messages) -> the prompt text."""
    system = "\n\n".join(m.get("content") or "" for m in messages if m["role"] == "system")
    if tools:
        system += ("\n\n" if system else "") + render_tools(tools)
    out = [bos, system]
    in_outputs = False  # inside a <｜tool▁outputs▁begin｜> block
    last_user = False
    for m in messages:
        role, text = m["role"], m.get("content") or ""
        if role == "user":
            if in_outputs:  # a user turn right after tool results closes them
                out.append(OUTPUTS_END)
            in_outputs, last_user = False, True
            out.append(f"{USER}{text}{ASSISTANT}")
        elif role == "assistant":
            last_user = False
            if in_outputs:
                out.append(OUTPUTS_END)
                in_outputs = False
            calls = m.get("tool_calls") or []
            if calls:
                out.append(text + CALLS_BEGIN + "\n".join(_call(c) for c in calls) + CALLS_END + EOS)
            else:
                out.append(text + EOS)
        elif role == "tool":
            last_user = False
            out.append(f"\n{OUTPUT_BEGIN}{text}{OUTPUT_END}" if in_outputs
                       else f"{OUTPUTS_BEGIN}{OUTPUT_BEGIN}{text}{OUTPUT_END}")
            in_outputs = True
    if in_outputs:
        out.append(OUTPUTS_END)  # the model answers the results straight after this tag
    elif add_generation_prompt and not last_user:
        out.append(ASSISTANT)
    return "".join(out)


def forced_prefill(name: str | None) -> str:
    """What the assistant is made to start with when tool_choice forces a call: the call block
    up to the arguments of the named function (or up to the name when any will do)."""
    head = f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}"
    return head if name is None else f"{head}{name}\n```json\n"
