"""API errors and the handlers that answer them in OpenAI's, Anthropic's or Ollama's error shape."""
from __future__ import annotations

import json
import logging
import re
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ...tokenizer.formats.chat_prompt import PromptError

log = logging.getLogger("moemesh.server")

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                    422: "invalid_request_error", 429: "rate_limit_error", 431: "request_too_large",
                    503: "overloaded_error"}
_OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                 503: "service_unavailable"}


class APIError(HTTPException):
    """An HTTP error with a message for the client; ``param`` names the offending field.

    An HTTPException, so that one raised while FastAPI reads the body (the body-size limit) is
    passed on to its handler rather than rewritten as "error parsing the body"."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or (_OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"))
        self.headers = headers

    def __str__(self) -> str:
        return self.message

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}  # Ollama's error shape: one string

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote what the client sent, and that
    text may not even be valid Unicode (a lone surrogate), which must not fail the error itself."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, err: APIError) -> dict[str, Any]:
    if is_ollama_path(path):
        return err.ollama_body()
    return err.anthropic_body() if is_anthropic_path(path) else err.openai_body()


def error_response(path: str, err: APIError) -> JSONResponse:
    return ErrorJSONResponse(error_body(path, err), status_code=err.status, headers=err.headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The field part of a pydantic loc: it stops at the first union-variant label ('str',
    'list[str]', "literal['a']", a model class name), which names a type, not a field."""
    out = []
    for p in loc:
        if not isinstance(p, int) and (p in _TYPE_LABELS or not re.fullmatch(r"[a-z_][a-z0-9_]*", str(p))):
            break
        out.append(p)
    return tuple(out)


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _most_telling(errors: list[Any]) -> dict[str, Any]:
    """The error to report: the first field's, and of a union's variants ('str', 'list[str]') the
    one that says more than "wrong type" (a too-long list, a bad item) when there is one."""
    field = _field_path(tuple(errors[0].get("loc", ())))
    same = [e for e in errors if _field_path(tuple(e.get("loc", ()))) == field]
    telling = [e for e in same if not str(e.get("type", "")).endswith("_type")]
    return (telling or same)[0]


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = _most_telling(list(errors)) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    param = _loc_to_param(_field_path(tuple(first.get("loc", ()))))
    if param is None and first.get("type") == "missing":  # no body at all
        return APIError(400, "the request has no body; send a JSON object (Content-Type: application/json)")
    if param is None and first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        if isinstance(first.get("input"), bytes):  # FastAPI parses only a JSON content type
            return APIError(400, "the request body must be JSON, sent with Content-Type: application/json")
        return APIError(400, f"the request body must be a JSON object, not {_json_kind(first.get('input'))}")
    if first.get("type") == "missing":
        message = f"missing required field {param!r}"
    else:
        message = f"invalid value for {param!r}: {first['msg']}" if param else first["msg"]
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(PromptError)
    async def _prompt(request: Request, exc: PromptError) -> JSONResponse:
        return error_response(request.url.path, APIError(400, str(exc), param=exc.param))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s:\n%s", request.url.path, traceback.format_exc())
        return error_response(request.url.path, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def function_tool_only(i: int, kind: str) -> None:
    """400 for ``tools[i]`` of a type other than ``function`` (the only kind moemesh runs)."""
    if kind != "function":
        raise APIError(400, f"tools[{i}]: tool type {kind!r} is not supported (function tools only)", param=f"tools[{i}].type")
