"""Request bodies of the Anthropic Messages API (POST /v1/messages, /v1/messages/count_tokens).

Content blocks stay plain dicts here; anthropic_convert checks each one and names the field
of any it cannot use.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ..common.limits import MAX_CONTENT_PARTS, MAX_INT32, MAX_MESSAGES, MAX_STOP, MAX_STOP_CHARS, MAX_TOOLS
from ..common.schema_base import StrictBody as _Body

Blocks = Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)]


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | Blocks


class AnthropicTool(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class CountTokensRequest(_Body):
    model: str | None = None  # one of the served names (404 otherwise); absent: the one model
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | Blocks | None = None
    tools: list[AnthropicTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: AnthropicToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)  # capped at what the context window leaves
    stop_sequences: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # accepted; whether a model thinks is up to its template
