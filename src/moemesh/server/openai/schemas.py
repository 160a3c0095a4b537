"""Request bodies of the OpenAI-compatible routes (and vLLM's /tokenize, /detokenize).

Strict types, finite numbers, valid text (schema_base.StrictBody); unknown fields ignored. The
ranges written here are the documented ones (the OpenAPI document shows them); SamplingParams.validate
checks the sampling ranges again where the engine takes them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ...engine.sampling_params import MAX_LOGPROBS
from ..common.limits import MAX_CONTENT_PARTS, MAX_INT32, MAX_MESSAGES, MAX_STOP, MAX_STOP_CHARS, MAX_TOOLS
from ..common.schema_base import StrictBody as _Body
from ..core.sampling import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

MAX_LEGACY_LOGPROBS = 5  # the legacy completions API's cap
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
ContentParts = Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)]
ONLY_ONE = {"minimum": 1, "maximum": 1}  # documented; other values get a 400 that says why


class FunctionDef(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | ContentParts | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # a previous turn's reasoning, sent back in history
    reasoning: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # absent: any JSON object
    strict: bool | None = None  # enforced either way (a grammar), as vLLM does


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # with type json_schema


class SamplingFields(_Body):
    model: str | None = None  # one of the served names (404 model_not_found otherwise); absent: the one model
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # HF's penalty divides and multiplies logits: far from 1 it overflows them (the sampler then fails)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, json_schema_extra=ONLY_ONE)  # one choice per request
    logit_bias: dict[str, float] | None = None  # refused when non-empty (not supported)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)  # capped at what the context window leaves
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension, e.g. {"enable_thinking": false}


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    response_format: ResponseFormat | None = None  # as in chat: the completion follows the schema
    max_tokens: int | None = Field(16, ge=1)  # the legacy API's default
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)  # the legacy API's cap
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, json_schema_extra=ONLY_ONE)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
