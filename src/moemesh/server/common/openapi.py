"""The served OpenAPI document (/openapi.json), made to say what the server does.

FastAPI documents a 422 for every route with a body; this server answers 400 with the API's error
body instead (errors.py), and its other errors (401, 404, 408, 413, 429, 500, 503) come from code
FastAPI cannot see. Routes list theirs with ``error_responses``; ``install_openapi`` drops the 422s.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


class OllamaError(BaseModel):
    error: str


_WHY = {
    400: "Invalid request: the error names the field (``param``)",
    401: "Missing or wrong API key (only when the server runs with --api-key)",
    404: "The model name is not one this server serves (``model_not_found``)",
    408: "The request's headers or body did not arrive in time",
    413: "The request body is over --max-body-bytes; refused before it is read",
    429: "The server is at --queue-size; retry after the Retry-After seconds",
    500: "The generation failed (the server keeps serving)",
    503: "The model is still loading (Retry-After) or failed to load",
}
BODY_ERRORS = (400, 401, 404, 408, 413, 503)  # every route that takes a JSON body
GENERATION_ERRORS = BODY_ERRORS + (429, 500)  # ... and starts a generation


def error_responses(*statuses: int, anthropic: bool = False, ollama: bool = False) -> dict[int | str, dict[str, Any]]:
    model = OllamaError if ollama else AnthropicError if anthropic else OpenAIError
    return {status: {"model": model, "description": _WHY[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    """Replace FastAPI's 422s (never sent) in the generated document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
