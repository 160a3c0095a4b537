"""GET /health, GET /metrics, GET /v1/models, POST /tokenize, POST /detokenize."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from .errors import APIError
from .openai_schemas import DetokenizeRequest, TokenizeRequest
from .prompting import chat_prompt_ids, text_prompt_ids
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
        text = state.metrics.render(running, waiting, state.expert_stats(), engine)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "moemesh",
                "max_model_len": state.context_length or None}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in (state.model_name, *state.config.model_aliases)]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return model_card(model_id)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        tokenizer = state.ready_tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            _, ids = await chat_prompt_ids(state, tokenizer, messages, None, None, check_fits=False)
        else:
            ids = await text_prompt_ids(state, tokenizer, body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": state.context_length, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        tokenizer = state.ready_tokenizer()
        vocab = tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        tokens = body.tokens  # decode_batch: the same text, with the GIL let go while it works
        return {"prompt": await state.off_loop(lambda: tokenizer.backend.decode_batch([tokens], skip_special_tokens=False)[0])}

    return router
