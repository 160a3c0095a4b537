"""Request fields -> the grammar a generation must follow (structured output), or a 400.

Only translation lives here: ``response_format`` (OpenAI's ``json_object`` / ``json_schema``) and
a forced ``tool_choice`` become a tokenizer.grammar.Grammar (tokenizer/formats/tool_grammar.py
writes it in the model's format), checked and started off the event loop. A forced call outranks
response_format (the answer is the call); with tools offered and tool_choice auto, a
response_format leaves no room for a call (the grammar is JSON from the first token).
"""
from __future__ import annotations

from typing import Any

from ...tokenizer.formats.chat_prompt import ToolMode
from ...tokenizer.formats.tool_grammar import ToolGrammarUnsupported, forced_call_grammar, response_grammar
from ...tokenizer.grammar import Grammar, GrammarError, Matcher
from ...tokenizer.tokenizer import Tokenizer
from ..common.errors import APIError
from .state import ServerState

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for (None: free text). ``response_format`` is the
    request's parsed field (type, json_schema.schema_)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT
    spec = response_format.json_schema
    if spec is None:
        raise APIError(400, "response_format of type json_schema needs a json_schema object",
                       param="response_format.json_schema")
    return ANY_OBJECT if spec.schema_ is None else spec.schema_


def grammar_for(tokenizer: Tokenizer, tool_mode: ToolMode | None, schema: dict[str, Any] | None,
                schema_param: str) -> tuple[Grammar | None, str]:
    """(grammar, the request field it came from); (None, "") when the output is free."""
    if tool_mode is not None and tool_mode.forced:
        try:
            return forced_call_grammar(tokenizer, tool_mode), "tools"
        except ToolGrammarUnsupported:
            return None, ""  # GLM / MiniMax: the prefilled head alone forces the call
        except GrammarError as exc:
            raise APIError(400, str(exc), param="tools") from None
    if schema is None:
        return None, ""
    return response_grammar(tokenizer, schema, schema_param), schema_param


async def start_matcher(state: ServerState, grammar: Grammar | None, param: str) -> Matcher | None:
    """Check the grammar (400 naming what cannot be enforced) and start a matcher for one request."""
    if grammar is None:
        return None
    compiler = await state.grammar_compiler()

    def build() -> Matcher:
        compiler.check(grammar, param)
        return compiler.matcher(grammar)

    try:
        return await state.off_loop(build)
    except GrammarError as exc:
        raise APIError(400, str(exc), param=exc.param or param) from None


async def request_matcher(state: ServerState, tokenizer: Tokenizer, tool_mode: ToolMode | None,
                          schema: dict[str, Any] | None, schema_param: str = "response_format.json_schema.schema") -> Matcher | None:
    grammar, param = grammar_for(tokenizer, tool_mode, schema, schema_param)
    return await start_matcher(state, grammar, param)
