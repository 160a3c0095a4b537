"""GET /health and GET /metrics: the server's own endpoints, open without an API key (probes and
scrapers need no secret)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from .core.state import ServerState

PROMETHEUS = "text/plain; version=0.0.4"


class Health(BaseModel):
    status: str  # ok | loading | failed
    model: str
    error: str | None = None  # why loading failed


def service_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    health_doc = {"model": Health, "description": "ready"}
    not_ready = {"model": Health, "description": "the model is loading, or failed to load (see error)"}

    @router.get("/health", response_model=None, responses={200: health_doc, 503: not_ready})
    async def health() -> JSONResponse:
        """200 once the model is loaded; 503 while loading (or if loading failed)."""
        body: dict[str, Any] = {"status": "ok" if state.status == "ready" else state.status, "model": state.model_name}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @router.get("/metrics", response_class=PlainTextResponse,
                responses={200: {"description": "Prometheus text exposition format 0.0.4"}})
    async def metrics() -> PlainTextResponse:
        running, waiting = state.queue_sizes()
        loop = state.engine_loop
        engine = (loop.steps, loop.step_failures, loop.cpu_seconds) if loop is not None else (0, 0, 0.0)
        prefix = state.prefix_cache.summary() if state.prefix_cache is not None else None
        text = state.metrics.render(running, waiting, state.expert_stats(), engine, state.kv_bytes_per_token, prefix)
        text += state.extra_metrics()
        return PlainTextResponse(text, media_type=PROMETHEUS)

    return router
