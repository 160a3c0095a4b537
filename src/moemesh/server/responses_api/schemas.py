"""The request body of POST /v1/responses (stateless: no previous_response_id, no stored items).

``input`` items stay free-form JSON here and are checked one by one in convert.py, so that an
unsupported item type gets a 400 naming it (``input[2].type``) rather than a union error."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ..common.limits import MAX_INT32, MAX_MESSAGES, MAX_TOOLS
from ..common.schema_base import StrictBody as _Body
from ..core.sampling import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

InputItem = dict[str, Any]


class FunctionTool(_Body):
    type: str  # "function"; other types (web_search, file_search, ...) get a 400 naming them
    name: str | None = Field(None, min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Body):
    type: str  # only "text": json_schema / json_object need a grammar (400 until one exists)


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(_Body):
    effort: str | None = None  # gpt-oss's reasoning_effort (low | medium | high); others ignore it
    summary: str | None = None


class ResponsesRequest(_Body):
    model: str | None = None  # one of the served names (404 model_not_found otherwise); absent: the one model
    input: str | Annotated[list[InputItem], Field(max_length=MAX_MESSAGES)]
    instructions: str | None = None  # a system message before the input
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)  # capped at what the context window leaves
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)  # vLLM's extension; -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    store: bool | None = None  # accepted; nothing is stored (stateless), the answer says store: false
    previous_response_id: str | None = None  # refused: this server keeps no responses
    conversation: str | dict[str, Any] | None = None  # refused, likewise
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    metadata: dict[str, str] | None = None  # echoed back
    truncation: Literal["disabled", "auto"] | None = None  # the context is never truncated either way
    user: str | None = None
