"""The ASGI app: routes, error shapes, API-key check, and loading the model after the HTTP
server is already up (so /health can answer 503 while it loads)."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .anthropic_messages import messages_router
from .auth import ApiKeyMiddleware
from .body_limit import BodyLimitMiddleware
from .errors import install_error_handlers
from .openai_chat import chat_router
from .openai_completions import completions_router
from .service_routes import service_router
from .sse import ClientGone
from .state import ServerState


def build_app(state: ServerState, on_loaded: Callable[[ServerState], None] | None = None) -> FastAPI:
    """``on_loaded`` runs on the loader thread once loading ended (ready or failed)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        def load() -> None:
            state.load()
            if on_loaded is not None:
                on_loaded(state)

        threading.Thread(target=load, name="moemesh-load", daemon=True).start()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="moemesh", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the generation was aborted

    for router in (service_router(state), chat_router(state), completions_router(state), messages_router(state)):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit=state.body_limit)
    app.add_middleware(ApiKeyMiddleware, api_key=state.config.api_key)  # outermost: no key, no body read
    return app
