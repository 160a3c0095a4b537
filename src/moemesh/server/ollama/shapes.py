"""What Ollama's routes answer, as models for the OpenAPI document only (the routes build their JSON
directly; tests/test_server_fuzz.py checks the answers against these)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ToolCallFunctionOut(BaseModel):
    index: int
    name: str
    arguments: dict[str, Any]


class ToolCallOut(BaseModel):
    id: str
    function: ToolCallFunctionOut


class MessageOut(BaseModel):
    role: str
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class _Done(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None  # stop | length | load (nothing to generate: the model is loaded)
    total_duration: int | None = None  # nanoseconds
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatAnswer(_Done):
    message: MessageOut


class GenerateAnswer(_Done):
    response: str
    thinking: str | None = None
    context: list[int] | None = None  # the prompt's and the answer's token ids (send back to continue)


class Details(BaseModel):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ModelEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class Tags(BaseModel):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    expires_at: str
    size_vram: int
    context_length: int


class Running(BaseModel):
    models: list[RunningModel]


class Show(BaseModel):
    modelfile: str
    parameters: str  # the model's recommended sampling, one "name value" a line
    template: str
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(BaseModel):
    version: str
