"""Structured output: JSON schemas and tool-call shapes -> grammars -> one matcher per sequence.

The library is llguidance (bench/grammar_libs.py measured it against xgrammar and outlines-core on
SmolLM2's vocabulary; docs/architecture.md says why): a grammar is compiled lazily, token by token,
so a new schema costs well under a millisecond before its first token (outlines-core built a
whole-vocabulary index per schema, seconds), and JSON-Schema keywords it cannot enforce are refused
by name ('Unimplemented keys: ["uniqueItems"]') instead of silently ignored, so a request that
asks for them gets a 400 that names them.

JSON may hold at most one space wherever JSON allows whitespace (so both ``{"a": 1}`` and
``{"a":1}``, as models write either): a grammar that lets whitespace run free lets a sampled model
pad with newlines until it runs out of tokens.

Lark grammars (llguidance's dialect) shape the text around JSON: ``%json {schema}`` embeds a
schema, ``<|name|>`` matches a special token, string literals are JSON-quoted.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import llguidance

from ..errors import MoemeshError
from .tokenizer import Tokenizer

# how JSON is written inside every grammar (llguidance's "x-guidance" options)
JSON_STYLE = {"whitespace_pattern": "[ ]?"}

_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")


class GrammarError(MoemeshError):
    """A schema or grammar that cannot be enforced; ``param`` names the request field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def styled(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with our JSON style; a schema's own x-guidance options are not honoured."""
    return {**schema, "x-guidance": JSON_STYLE}


def literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def json_rule(schema: dict[str, Any] | bool) -> str:
    """A Lark item that matches one JSON value valid under ``schema``."""
    if schema is True or schema == {}:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {json.dumps(schema)[:80]}")
    return "%json " + json.dumps(styled(schema), ensure_ascii=False)


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form, and what it was made for (for error messages)."""

    text: str
    what: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any], what: str = "JSON schema") -> Grammar:
        if not isinstance(schema, dict):
            raise GrammarError(f"{what} must be a JSON object, got {type(schema).__name__}")
        return cls(llguidance.LLMatcher.grammar_from_json_schema(styled(schema)), what)

    @classmethod
    def lark(cls, source: str, what: str) -> Grammar:
        return cls(llguidance.LLMatcher.grammar_from_lark(source), what)


class Matcher:
    """One sequence's grammar state: the bitmask of the tokens it allows next, advanced by each
    sampled token. Not thread-safe; the engine thread alone uses it once it is made."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def fill(self, row: Any) -> None:
        """Write the allowed-token bitmask into ``row`` (a contiguous int32 torch tensor, [W])."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def advance(self, token: int) -> bool:
        """Consume a sampled token; False when the grammar does not allow it (the matcher is then in error)."""
        return bool(self._m.consume_token(token))

    @property
    def done(self) -> bool:
        """Nothing but an end-of-turn token can follow (or the matcher failed)."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return str(self._m.get_error())

    def accepting(self) -> bool:
        return bool(self._m.is_accepting())


class GrammarCompiler:
    """One model's vocabulary made ready for grammars (~1 s, once), checks grammars and starts matchers.

    stop_ids: the tokens that end a turn for the engine; a grammar that is complete allows only them."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: frozenset[int]) -> None:
        self.vocab_size = tokenizer.vocab_size
        self._tok = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                           eos_token=sorted(stop_ids))

    def check(self, grammar: Grammar, param: str | None = None) -> None:
        """GrammarError naming what cannot be enforced (unsupported keywords, unknown formats) or why
        the grammar is invalid."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.text, self._tok)
        if not messages:
            return
        text = "; ".join(messages)
        found = _UNIMPLEMENTED.search(text)
        if found:
            keys = ", ".join(k.strip().strip('"') for k in found.group(1).split(","))
            raise GrammarError(f"{grammar.what} uses JSON Schema features that structured output does not "
                               f"support: {keys}", param)
        if is_error:
            raise GrammarError(f"{grammar.what} cannot be enforced: {text}", param)
        raise GrammarError(f"{grammar.what} cannot be fully enforced ({text}); remove what is named", param)

    def matcher(self, grammar: Grammar) -> Matcher:
        m = llguidance.LLMatcher(self._tok, grammar.text, log_level=0)
        if m.is_error():
            raise GrammarError(f"{grammar.what} cannot be enforced: {m.get_error()}")
        return Matcher(m)
