"""Grammars that hold a forced tool call (tool_choice required / named) and a structured answer
(response_format) to their shape, in each format moemesh parses.

A forced call's head is still prefilled (chat_prompt._forced_prefill: the parsers read it as the
model's own output); the grammar covers what follows, up to the call's closing: the function
name when any tool will do, the arguments as JSON valid under that tool's parameter schema, and
the format's end markers, after which only an end-of-turn token is allowed:

    Hermes    <tool_call>\\n{"name": "  NAME", "arguments": ARGS}\\n</tool_call>
    Harmony   <|channel|>commentary to=functions.  NAME <|constrain|>json<|message|>ARGS<|call|>
    DeepSeek  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>  NAME\\n```json\\nARGS\\n```
              <｜tool▁call▁end｜><｜tool▁calls▁end｜>
    Kimi      <|tool_calls_section_begin|><|tool_call_begin|>functions.  NAME:0<|tool_call_argument_begin|>ARGS
              <|tool_call_end|><|tool_calls_section_end|>

(the prefill is left of the gap). GLM and MiniMax write each argument as tagged text rather than
JSON; their grammars are not written yet (``ToolGrammarUnsupported``: the prefill alone enforces
their calls, as before).
"""
from __future__ import annotations

import json
from typing import Any

from ..grammar import Grammar, GrammarError, json_rule, literal
from ..tokenizer import Tokenizer
from . import deepseek_chat, harmony, tool_formats
from .chat_prompt import ToolMode
from .deepseek_tools import CALL_END, CALLS_END
from .tool_parser import TOOL_CLOSE


class ToolGrammarUnsupported(GrammarError):
    """No grammar for this model's tool-call format (the prefill still forces the call)."""


def token(tokenizer: Tokenizer, text: str) -> str:
    """A Lark item for a format marker: the special token by id when the vocabulary has it as one
    token (a literal's bytes never match a special token), else the literal text."""
    tid = tokenizer.token_to_id(text)
    return f"<[{tid}]>" if tid is not None else literal(text)


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    if params is None:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise GrammarError(f"tool {fn.get('name')!r}: parameters must be a JSON schema object")
    return params


def _tools_by_name(mode: ToolMode) -> dict[str, dict[str, Any]]:
    return {str(t.get("function", t).get("name")): t for t in mode.tools}


def forced_call_grammar(tokenizer: Tokenizer, mode: ToolMode) -> Grammar:
    """The grammar after a forced call's prefill (chat_prompt._forced_prefill) in this model's format."""
    tools = _tools_by_name(mode)
    wanted = [mode.name] if mode.name else sorted(tools)
    if fmt := tool_formats.format_of(tokenizer.chat_template):
        if fmt != "kimi":
            raise ToolGrammarUnsupported(f"no tool-call grammar for the {fmt} format yet")
        name_tail = lambda n: literal(f"{n}:")  # noqa: E731
        tail = (f"{literal('0')} {token(tokenizer, tool_formats.KIMI_ARGS)} {{args}} {token(tokenizer, tool_formats.KIMI_END)} "
                f"{token(tokenizer, tool_formats.KIMI_CLOSE)}")
    elif harmony.is_harmony(tokenizer):
        name_tail = lambda n: literal(f"{n} ") + f" {token(tokenizer, harmony.CONSTRAIN)} " + literal("json") + \
            f" {token(tokenizer, harmony.MESSAGE)}"  # noqa: E731
        tail = f"{{args}} {token(tokenizer, harmony.CALL)}"
    elif deepseek_chat.writes_deepseek_tools(tokenizer):
        name_tail = lambda n: literal(f"{n}\n```json\n")  # noqa: E731
        tail = f"{{args}} {literal(chr(10) + '```')} {token(tokenizer, CALL_END)} {token(tokenizer, CALLS_END)}"
    else:  # Hermes: the prefill ends inside the JSON object
        name_tail = lambda n: literal(json.dumps(n, ensure_ascii=False)[1:] + ', "arguments": ')  # noqa: E731
        tail = "{args} " + literal("}\n" + TOOL_CLOSE)
    rules = []
    for i, name in enumerate(wanted):
        body = tail.replace("{args}", json_rule(_parameters(tools[name])))
        head = "" if mode.name else name_tail(name) + " "
        rules.append(f"call_{i}: {head}{body}")
    lark = "start: " + " | ".join(f"call_{i}" for i in range(len(wanted))) + "\n" + "\n".join(rules) + "\n"
    what = f"the parameters of tool {mode.name!r}" if mode.name else "the tools' parameters"
    return Grammar.lark(lark, what)


def response_grammar(tokenizer: Tokenizer, schema: dict[str, Any], what: str) -> Grammar:
    """The answer as JSON valid under ``schema``, in the model's format (Harmony: the final channel)."""
    if harmony.is_harmony(tokenizer):
        lark = (f"start: {token(tokenizer, harmony.CHANNEL)} {literal('final')} {token(tokenizer, harmony.MESSAGE)} "
                f"{json_rule(schema)} {token(tokenizer, harmony.RETURN)}\n")
        return Grammar.lark(lark, what)
    return Grammar.json_schema(schema, what)
