"""What POST /v1/responses answers, as models for the OpenAPI document only (the route builds its
JSON directly; tests/test_server_fuzz.py checks the answers against these)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[dict[str, Any]] | None = None


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"]
    text: str


class MessageItem(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["completed", "incomplete", "in_progress"]
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it
    status: Literal["completed", "incomplete", "in_progress"]


class ReasoningItem(BaseModel):
    type: Literal["reasoning"]
    id: str
    summary: list[Any]
    content: list[ReasoningText]
    status: Literal["completed", "incomplete", "in_progress"] | None = None


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[MessageItem | FunctionCallItem | ReasoningItem]
    parallel_tool_calls: bool
    previous_response_id: None
    store: bool
    temperature: float
    top_p: float
    tool_choice: Any
    tools: list[dict[str, Any]]
    text: dict[str, Any]
    truncation: str
    metadata: dict[str, str]
    usage: ResponseUsage | None
