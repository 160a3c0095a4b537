"""The request-body size limit, checked before anything is parsed (HTTP 413).

A declared ``Content-Length`` over the limit is refused before one byte of the body is read; a
chunked body is counted as it arrives and refused once it passes the limit. Either way the body
is never held whole. The unread rest is discarded by the HTTP protocol (bounded by its body
timeout), so the client still reads the 413 instead of a reset connection.
"""
from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_response


def too_large(size: int | None, limit: int) -> APIError:
    got = f"{size} bytes" if size is not None else "more"
    return APIError(413, f"the request body is {got}; this server accepts at most {limit} bytes "
                    "(--max-body-bytes)", code="request_too_large")


class BodyLimitMiddleware:
    """A plain ASGI middleware; ``limit()`` is read per request (it grows once the model's context
    window is known)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await error_response(scope.get("path", ""), too_large(declared, limit))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # APIError: the route's error handler answers 413
                    raise too_large(None if declared is None else received, limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before we see it
    return None
