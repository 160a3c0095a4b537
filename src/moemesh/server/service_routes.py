"""GET /health, GET /metrics, GET /v1/models, POST /tokenize, POST /detokenize."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from .chat_prompt import build_chat_prompt
from .errors import APIError
from .openai_schemas import DetokenizeRequest, TokenizeRequest
from .state import ServerState


def service_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        """200 once the model is loaded; 503 while loading (or if loading failed)."""
        body: dict[str, Any] = {"status": "ok" if state.status == "ready" else state.status, "model": state.model_name}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @router.get("/metrics")
    async def metrics() -> PlainTextResponse:
        running, waiting = state.queue_sizes()
        loop = state.engine_loop
        engine = (loop.steps, loop.step_failures, loop.cpu_seconds) if loop is not None else (0, 0, 0.0)
        prefix = state.prefix_cache.summary() if state.prefix_cache is not None else None
        text = state.metrics.render(running, waiting, state.expert_stats(), engine, state.kv_bytes_per_token, prefix)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "moemesh",
                "max_model_len": state.context_length or None}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != state.model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        tokenizer = state.ready_tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            plan = build_chat_prompt(tokenizer, [m.model_dump(exclude_none=True) for m in body.messages], None, None)
            ids = tokenizer.encode(plan.text)
        else:
            ids = tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": state.context_length, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        tokenizer = state.ready_tokenizer()
        vocab = tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return router
