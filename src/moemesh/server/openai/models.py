"""GET /v1/models and GET /v1/models/{id}: the served model, under its name and its aliases."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..common.openapi import error_responses
from ..core.state import ServerState
from .responses import ModelCard, ModelList


def models_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "moemesh",
                "max_model_len": state.context_length or None,
                "sampling_defaults": state.sampling_defaults.values()}  # what a request that omits them gets

    @router.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **error_responses(401)})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(name) for name in (state.model_name, *state.config.model_aliases)]}

    @router.get("/v1/models/{model_id:path}", response_model=None,
                responses={200: {"model": ModelCard}, **error_responses(401, 404)})
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return card(model_id)

    return router
