"""POST /v1/messages (Anthropic Messages API, streamed or whole) and /v1/messages/count_tokens."""
from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from ...models.media import Media
from ...tokenizer.formats.chat_prompt import PromptPlan
from ...tokenizer.formats.tool_parser import TOOL_CLOSE, TOOL_OPEN
from ..common.openapi import BODY_ERRORS, GENERATION_ERRORS, error_responses
from ..core.generation import Generation, GenerationRequest, Outcome
from ..core.prompting import chat_prompt_ids
from ..core.sampling import make_params
from ..core.sse import SSE, run_or_disconnect, sse, sse_response
from ..core.state import ServerState
from ..core.structured import request_matcher
from .convert import chat_messages, chat_tool_choice, chat_tools
from .responses import Message, TokenCount
from .schemas import CountTokensRequest, MessagesRequest

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def stop_reason(outcome: Outcome) -> str:
    if outcome.stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(outcome.finish_reason, "end_turn")


def content_blocks(outcome: Outcome) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if outcome.reasoning:
        blocks.append({"type": "thinking", "thinking": outcome.reasoning, "signature": ""})
    text = outcome.content
    calls = []
    for call in outcome.tool_calls:
        if call.valid:
            calls.append({"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)})
        else:  # input must be an object: a call with broken arguments stays visible as text
            text += f'{TOOL_OPEN}{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}{TOOL_CLOSE}'
    if text or not calls:
        blocks.append({"type": "text", "text": text})
    return blocks + calls


def message_response(outcome: Outcome, msg_id: str, model: str) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": content_blocks(outcome), "stop_reason": stop_reason(outcome),
            "stop_sequence": outcome.stop_sequence,
            "usage": {"input_tokens": outcome.prompt_tokens, "output_tokens": outcome.completion_tokens}}


async def stream_message(gen: Generation, msg_id: str, model: str) -> AsyncIterator[str]:
    """message_start, then per block content_block_start / *_delta / content_block_stop, then
    message_delta (stop_reason, usage) and message_stop."""
    yield sse({"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": gen.outcome.prompt_tokens, "output_tokens": 0}}}, "message_start")
    index, open_kind = -1, None  # the open block: thinking | text | tool_use

    def start(kind: str, block: dict[str, Any]) -> list[str]:
        nonlocal index, open_kind
        events = [sse({"type": "content_block_stop", "index": index}, "content_block_stop")] if open_kind else []
        index, open_kind = index + 1, kind
        events.append(sse({"type": "content_block_start", "index": index, "content_block": block},
                          "content_block_start"))
        return events

    def delta(body: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": index, "delta": body}, "content_block_delta")

    async for d in gen.deltas():
        if d.reasoning:
            if open_kind != "thinking":
                for e in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                    yield e
            yield delta({"type": "thinking_delta", "thinking": d.reasoning})
        if d.content:
            if open_kind != "text":
                for e in start("text", {"type": "text", "text": ""}):
                    yield e
            yield delta({"type": "text_delta", "text": d.content})
        for t in d.tool_calls:
            if t.id is not None:
                for e in start("tool_use", {"type": "tool_use", "id": t.id, "name": t.name, "input": {}}):
                    yield e
            if t.arguments:
                yield delta({"type": "input_json_delta", "partial_json": t.arguments})
    outcome = gen.outcome
    if outcome.error is not None:
        yield sse(outcome.error.anthropic_body(), "error")
        return
    if open_kind is None:  # an empty answer still has one (empty) text block
        for e in start("text", {"type": "text", "text": ""}):
            yield e
    yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
    yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason(outcome),
                                                  "stop_sequence": outcome.stop_sequence},
               "usage": {"output_tokens": outcome.completion_tokens}}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")


def messages_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    async def plan_of(body: CountTokensRequest, check_fits: bool) -> tuple[PromptPlan, list[int], Media | None]:
        tokenizer = state.tokenizer_for(body.model)
        return await chat_prompt_ids(state, tokenizer, chat_messages(body, state.config.images), chat_tools(body),
                                     chat_tool_choice(body.tool_choice), check_fits=check_fits,
                                     encode_images=check_fits)

    @router.post("/v1/messages/count_tokens", response_model=None, responses={
        200: {"model": TokenCount}, **error_responses(*BODY_ERRORS, anthropic=True)})
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        _, ids, _ = await plan_of(body, check_fits=False)
        return {"input_tokens": len(ids)}

    @router.post("/v1/messages", response_model=None, responses={
        200: {"model": Message, "content": SSE}, **error_responses(*GENERATION_ERRORS, anthropic=True)})
    async def messages(body: MessagesRequest, request: Request) -> Any:
        plan, prompt_ids, media = await plan_of(body, check_fits=True)
        grammar = await request_matcher(state, state.ready_tokenizer(), plan.tool_mode, None)  # tool_choice any / tool
        params = make_params(
            defaults=state.sampling_defaults,
            prompt_len=len(prompt_ids), context_length=state.context_length, max_tokens=body.max_tokens,
            max_tokens_field="max_tokens", temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            stop=body.stop_sequences,
        )
        gen = state.start_generation(GenerationRequest(prompt_ids, params, prefill=plan.prefill,
                                                       tool_mode=plan.tool_mode,
                                                       start_in_reasoning=plan.start_in_reasoning, media=media,
                                                       grammar=grammar),
                                     tool_id_prefix="toolu_")
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        if body.stream:
            return sse_response(stream_message(gen, msg_id, state.model_name), gen)
        outcome = await run_or_disconnect(request, gen)
        if outcome.error is not None:
            raise outcome.error
        return message_response(outcome, msg_id, state.model_name)

    return router
