"""POST /v1/completions: OpenAI's legacy text-completion API (text or token-id prompt)."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from ...tokenizer.tokenizer import Tokenizer
from ..common.errors import APIError
from ..core.generation import Generation, GenerationRequest, Outcome, TokenLogprob
from ..core.prompting import text_prompt_ids
from ..core.sampling import check_prompt_fits, make_params
from ..core.sse import DONE, run_or_disconnect, sse, sse_response, streamed_responses
from ..core.state import ServerState
from ..core.structured import request_matcher, response_format_schema
from .chat import ResponseMeta, reject_unsupported, usage
from .responses import Completion
from .schemas import CompletionRequest


async def prompt_ids_of(prompt: str | list, tokenizer: Tokenizer, state: ServerState) -> tuple[list[int], str]:
    """(token ids, prompt text) of the one prompt; a batch of prompts is refused."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt holds {len(prompt)} prompts; send one request per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await text_prompt_ids(state, tokenizer, prompt), prompt
    if len(prompt) >= state.context_length:  # before decoding it for echo
        check_prompt_fits(len(prompt), state.context_length, "prompt")
    vocab = tokenizer.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return list(prompt), tokenizer.decode(prompt)


def legacy_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


async def stream_completion(gen: Generation, meta: ResponseMeta, echo: str, include_usage: bool,
                            logprobs: bool) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None, lp: Any = None) -> str:
        body: dict[str, Any] = {"id": meta.id, "object": "text_completion", "created": meta.created,
                                "model": meta.model,
                                "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    if echo:
        yield chunk(echo)
    offset = len(echo)
    async for d in gen.deltas():
        lp = legacy_logprobs(d.logprobs, offset) if logprobs and d.logprobs else None
        if d.content or lp:
            yield chunk(d.content, lp=lp)
        offset += len(d.content)
    outcome = gen.outcome
    if outcome.error is not None:
        yield sse(outcome.error.openai_body())
        yield DONE
        return
    yield chunk("", finish=outcome.finish_reason)
    if include_usage:
        yield sse({"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                   "choices": [], "usage": usage(outcome)})
    yield DONE


def completion_response(outcome: Outcome, meta: ResponseMeta, echo: str, logprobs: bool) -> dict[str, Any]:
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "text": echo + outcome.content,
                         "logprobs": legacy_logprobs(outcome.logprobs, len(echo)) if logprobs else None,
                         "finish_reason": outcome.finish_reason}],
            "usage": usage(outcome)}


def completions_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions", response_model=None, responses=streamed_responses(Completion))
    async def completions(body: CompletionRequest, request: Request) -> Any:
        reject_unsupported(body)  # the body's own 400s first: they do not depend on the server's state
        tokenizer = state.tokenizer_for(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of must be 1", param="best_of")
        prompt_ids, prompt_text = await prompt_ids_of(body.prompt, tokenizer, state)
        check_prompt_fits(len(prompt_ids), state.context_length, "prompt")
        grammar = await request_matcher(state, tokenizer, None, response_format_schema(body.response_format))
        params = make_params(
            defaults=state.sampling_defaults,
            prompt_len=len(prompt_ids), context_length=state.context_length, max_tokens=body.max_tokens,
            max_tokens_field="max_tokens", temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            min_p=body.min_p, seed=body.seed, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            stop=body.stop_list(), logprobs=body.logprobs,
        )
        gen = state.start_generation(GenerationRequest(prompt_ids, params, parse_reasoning=False,
                                                       ignore_eos=body.ignore_eos, grammar=grammar))
        meta = ResponseMeta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
        echo = prompt_text if body.echo else ""
        want_lp = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(stream_completion(gen, meta, echo, include_usage, want_lp), gen)
        outcome = await run_or_disconnect(request, gen)
        if outcome.error is not None:
            raise outcome.error
        return completion_response(outcome, meta, echo, want_lp)

    return router
