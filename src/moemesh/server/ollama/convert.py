"""Ollama requests -> the internal shapes: model names (``name:latest``), chat messages and tools,
options -> sampling fields, and the refusals for what this server does not do."""
from __future__ import annotations

import json
from typing import Any

from ...tokenizer.tokenizer import Tokenizer
from ..common.errors import APIError, function_tool_only
from ..core.state import ServerState
from ..core.structured import ANY_OBJECT
from .schemas import ChatRequest, GenerateRequest, Options, _Generation

LATEST = ":latest"
_ROLES = ("system", "user", "assistant", "tool")


def model_name(state: ServerState, name: str | None) -> None:
    """Ollama clients name a model ``NAME:TAG``; ``NAME:latest`` is the served NAME (404 otherwise)."""
    if name is not None and name.endswith(LATEST):
        try:
            state.check_model(name[: -len(LATEST)])
            return
        except APIError:
            pass
    state.check_model(name)


def tagged(name: str) -> str:
    """How Ollama lists a model: with its tag."""
    return name if ":" in name else name + LATEST


def format_schema(body: _Generation) -> dict[str, Any] | None:
    """Ollama's ``format`` -> the JSON schema the answer must follow (None: free text): "json" is any
    JSON object (as OpenAI's json_object), an object is a JSON schema; the grammar enforces either."""
    f = body.format
    if f is None or f == "":
        return None
    if f == "json":
        return dict(ANY_OBJECT)
    if isinstance(f, dict):
        return f
    raise APIError(400, f'format must be "json" or a JSON schema object (got {f!r})', param="format")


def ready_for(state: ServerState, body: _Generation) -> Tokenizer:
    """A generation request's first checks (model name, model loaded, ``format``) -> the tokenizer."""
    model_name(state, body.model)
    tokenizer = state.ready_tokenizer()
    format_schema(body)
    return tokenizer


def template_kwargs(body: _Generation) -> dict[str, Any] | None:
    """Ollama's ``think`` -> the template's ``enable_thinking`` (Qwen3-style templates read it)."""
    if body.think is None:
        return None
    return {"enable_thinking": body.think not in (False, "false", "none")}


def sampling(options: Options | None) -> dict[str, Any]:
    """make_params keyword arguments from Ollama's options (None: the model's default)."""
    o = options or Options()
    predict = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None  # <= 0: up to the context
    return {"temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k, "min_p": o.min_p, "seed": o.seed,
            "max_tokens": predict, "max_tokens_field": "options.num_predict", "stop": list(o.stop or []),
            "repetition_penalty": o.repeat_penalty, "presence_penalty": o.presence_penalty,
            "frequency_penalty": o.frequency_penalty}


def chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # ids of the calls whose results have not come yet (Ollama names the tool, not the call)
    calls_seen = 0
    for i, m in enumerate(body.messages):
        at = f"messages[{i}]"
        if m.role not in _ROLES:
            raise APIError(400, f"{at}.role must be one of {', '.join(_ROLES)} (got {m.role!r})", param=f"{at}.role")
        if m.images:
            raise APIError(400, f"{at}.images: images are not supported on /api/chat", param=f"{at}.images")
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.thinking:
            msg["reasoning_content"] = m.thinking
        if m.role == "assistant" and m.tool_calls:
            msg["tool_calls"] = []
            for c in m.tool_calls:
                calls_seen += 1
                call_id = c.id or f"call_{calls_seen}"
                pending.append(call_id)
                msg["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": c.function.name, "arguments": json.dumps(c.function.arguments, ensure_ascii=False)}})
        if m.role == "tool":
            msg["tool_call_id"] = pending.pop(0) if pending else f"call_{calls_seen}"
            if m.tool_name:
                msg["name"] = m.tool_name
        out.append(msg)
    return out


def chat_tools(body: ChatRequest) -> list[dict[str, Any]] | None:
    """The same dict the OpenAI chat route makes (so the prompt is the same too)."""
    if not body.tools:
        return None
    for i, t in enumerate(body.tools):
        function_tool_only(i, t.type)
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in body.tools]


def generate_messages(body: GenerateRequest) -> list[dict[str, Any]]:
    """/api/generate without raw: the prompt as one user turn (after the system prompt, if any)."""
    for field in ("suffix", "template"):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported on /api/generate", param=field)
    if body.images:
        raise APIError(400, "images are not supported on /api/generate", param="images")
    system = [{"role": "system", "content": body.system}] if body.system else []
    return [*system, {"role": "user", "content": body.prompt}]
