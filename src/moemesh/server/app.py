"""The ASGI app: every API surface's routes, the error shapes, the API-key check and the body-size
limit, and loading the model after the HTTP server is already up (so /health can answer 503 while
it loads)."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .anthropic.messages import messages_router
from .common.auth import ApiKeyMiddleware
from .common.body_limit import BodyLimitMiddleware
from .common.errors import install_error_handlers
from .common.openapi import install_openapi
from .core.sse import ClientGone
from .core.state import ServerState
from .ollama.generate import generate_router
from .ollama.info import info_router
from .openai.chat import chat_router
from .openai.completions import completions_router
from .openai.models import models_router
from .openai.tokenize import tokenize_router
from .responses_api.routes import responses_router
from .service import service_router


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

    app = FastAPI(title="moemesh", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI- and Anthropic-compatible API of one model (moemesh serve).")
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the generation was aborted

    # one router per surface; new surfaces (Responses, Ollama) add theirs here
    routers = (service_router, models_router, tokenize_router, chat_router, completions_router, messages_router,
               responses_router, generate_router, info_router)
    for router in routers:
        app.include_router(router(state))
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, limit=state.body_limit)
    app.add_middleware(ApiKeyMiddleware, api_key=state.config.api_key)  # outermost: no key, no body read
    return app
