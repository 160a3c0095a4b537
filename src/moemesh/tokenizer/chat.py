"""Rendering a model's Jinja chat template the way transformers does (sandboxed)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moemesh.errors import MoemeshError


class ChatTemplateError(MoemeshError):
    """The model has no chat template, or its template rejected the conversation."""


class _GenerationTag(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker).

    We never need the mask, so the block just renders its body.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's built-in tojson escapes HTML characters; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template; render() turns messages into the prompt text."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._compiled: jinja2.Template | None = None
        if source is not None:
            try:
                self._compiled = _environment().from_string(source)
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        if self._compiled is None:
            raise ChatTemplateError(
                "this model has no chat template (tokenizer_config.json / GGUF tokenizer.chat_template); "
                "use plain-text prompts instead"
            )
        context = {"bos_token": self._bos_token, "eos_token": self._eos_token, **kwargs}
        try:
            return self._compiled.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **context
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from None
