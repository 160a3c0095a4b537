"""API-key check for the model routes: ``Authorization: Bearer KEY`` (OpenAI) or ``x-api-key``
(Anthropic). /health and /metrics stay open so probes and scrapers need no secret."""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, error_response

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/api/")  # /api/: Ollama's routes


def presented_key(headers: dict[str, str]) -> str | None:
    if "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class ApiKeyMiddleware:
    """A plain ASGI middleware (not BaseHTTPMiddleware, which would buffer streams)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.api_key or not path.startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = presented_key(headers)
        # constant time; the header's own bytes (it was decoded as latin-1) against the key's UTF-8
        if key is None or not hmac.compare_digest(key.encode("latin-1"), self.api_key.encode("utf-8")):
            message = "missing API key" if key is None else "invalid API key"
            err = APIError(401, f"{message}: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                           code="invalid_api_key", type="invalid_request_error")
            await error_response(path, err)(scope, receive, send)
            return
        await self.app(scope, receive, send)
