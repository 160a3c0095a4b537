"""Server-sent events, and running a request so that a client who leaves stops its generation."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from ..common.openapi import GENERATION_ERRORS, error_responses
from .generation import Generation, Outcome

DONE = "data: [DONE]\n\n"
# the OpenAPI content of a streamed answer (``stream: true``) beside its JSON one: before OpenAPI 3.2,
# the schema of an event stream describes one event (its data: a JSON chunk, or OpenAI's [DONE])
SSE_EVENT = {"type": "object", "required": ["data"], "description": "one server-sent event (stream: true)",
             "properties": {"event": {"type": "string"}, "data": {"type": "string", "contentMediaType": "application/json"},
                            "id": {"type": "string"}, "retry": {"type": "integer"}}}
SSE = {"text/event-stream": {"schema": SSE_EVENT}}


def streamed_responses(model: Any) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a generation route: ``model`` as JSON or an SSE stream, and its errors."""
    return {200: {"model": model, "content": SSE}, **error_responses(*GENERATION_ERRORS)}


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_response(body: AsyncIterator[str], generation: Generation) -> StreamingResponse:
    """Stream ``body``; when the client disconnects Starlette cancels it, and the generation's
    cleanup (abort the sequence, free the slot) runs in its ``finally``; the background task is a
    second guard for a stream that never started."""
    return StreamingResponse(
        body, media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(generation.close),
    )


class ClientGone(Exception):
    """The client disconnected before a non-streamed answer was ready."""


async def _wait_disconnect(request: Request) -> None:
    while True:  # the body was read already, so the next message is the disconnect
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_or_disconnect(request: Request, generation: Generation) -> Outcome:
    """Run a generation to the end; if the client leaves first, abort it and raise ClientGone."""
    work = asyncio.ensure_future(generation.run())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    try:
        await work
    except asyncio.CancelledError:
        pass
    generation.close()
    raise ClientGone()
