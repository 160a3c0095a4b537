"""POST /tokenize and POST /detokenize (vLLM's extensions of the OpenAI surface)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..common.errors import APIError
from ..common.openapi import BODY_ERRORS, error_responses
from ..core.images import openai_images
from ..core.prompting import chat_prompt_ids, text_prompt_ids
from ..core.state import ServerState
from .responses import Detokenized, Tokenized
from .schemas import DetokenizeRequest, TokenizeRequest


def tokenize_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize", response_model=None, responses={200: {"model": Tokenized}, **error_responses(*BODY_ERRORS)})
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        tokenizer = state.tokenizer_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            _, ids, _ = await chat_prompt_ids(state, tokenizer, openai_images(messages, state.config.images), None, None,
                                              check_fits=False, encode_images=False)
        else:
            ids = await text_prompt_ids(state, tokenizer, body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": state.context_length, "tokens": ids}

    @router.post("/detokenize", response_model=None,
                 responses={200: {"model": Detokenized}, **error_responses(*BODY_ERRORS)})
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        tokenizer = state.tokenizer_for(body.model)
        vocab = tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        tokens = body.tokens  # decode_batch: the same text as decode, with the GIL let go while it works
        return {"prompt": await state.off_loop(lambda: tokenizer.backend.decode_batch([tokens],
                                                                                     skip_special_tokens=False)[0])}

    return router
