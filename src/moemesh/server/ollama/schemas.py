"""Request bodies of Ollama's routes. Options Ollama knows but that change nothing here (num_ctx,
num_thread, num_gpu, mirostat ...) are ignored, as Ollama ignores the ones a runner lacks."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from ..common.limits import MAX_INT32, MAX_MESSAGES, MAX_STOP, MAX_STOP_CHARS, MAX_TOOLS
from ..common.schema_base import StrictBody as _Body
from ..core.sampling import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class Options(_Body):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT32)  # 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    num_predict: int | None = Field(None, ge=-2, le=MAX_INT32)  # -1 (infinite) / -2 (fill): up to the context
    stop: list[StopString] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    repeat_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    num_ctx: int | None = None  # the server's context window is fixed at start (--ctx): ignored


class ToolCallFunction(_Body):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = {}


class ToolCall(_Body):
    id: str | None = None
    function: ToolCallFunction


class Message(_Body):
    role: str  # system | user | assistant | tool
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None  # refused when non-empty (not supported on this route)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_name: str | None = None  # a tool message: the tool whose result it is


class ToolFunction(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: str = "function"
    function: ToolFunction


class _Generation(_Body):
    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    options: Options | None = None
    format: str | dict[str, Any] | None = None  # "json" or a JSON schema: the answer follows it (a grammar)
    keep_alive: float | int | str | None = None  # the model stays loaded for the server's life: ignored
    think: bool | str | None = None  # passed to the template as enable_thinking


class ChatRequest(_Generation):
    messages: list[Message] = Field([], max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)


class GenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    raw: bool = False  # the prompt as it is, no chat template
    context: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] | None = None  # an earlier answer's context
    suffix: str | None = None  # refused when non-empty (no fill-in-the-middle)
    template: str | None = None  # refused when non-empty (the model's own template is used)
    images: list[str] | None = None  # refused when non-empty


class ShowRequest(_Body):
    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)  # older clients' spelling of model
    verbose: bool = False
