"""POST /api/chat and POST /api/generate: Ollama's generation routes, streamed as NDJSON (one JSON
object per line, Ollama's default) or whole (``stream: false``). Durations: prompt_eval_duration from
the request to the first token (templating, queueing and prefill), eval_duration from the first
token to the last."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from ...tokenizer.formats.tool_parser import TOOL_CLOSE, TOOL_OPEN
from ..common.errors import APIError
from ..common.openapi import GENERATION_ERRORS, error_responses
from ..core.generation import Generation, GenerationRequest, Outcome
from ..core.prompting import chat_prompt_ids, text_prompt_ids
from ..core.sampling import check_prompt_fits, make_params
from ..core.sse import run_or_disconnect
from ..core.state import ServerState
from ..core.structured import request_matcher
from .convert import chat_messages, chat_tools, format_schema, generate_messages, ready_for, sampling, template_kwargs
from .schemas import ChatRequest, GenerateRequest
from .shapes import ChatAnswer, GenerateAnswer

NDJSON = "application/x-ndjson"
NDJSON_DOC = {NDJSON: {"schema": {"type": "string", "description": "one JSON object a line (stream: true)"}}}


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def line(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"


class Clock:
    """Request start, first and last token (the generation records when they came)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def stats(self, outcome: Outcome) -> dict[str, int]:
        end = time.perf_counter()
        first, last = outcome.first_token_time or end, outcome.last_token_time or end
        ns = 1_000_000_000
        return {"total_duration": int((end - self.start) * ns), "load_duration": 0,
                "prompt_eval_count": outcome.prompt_tokens, "prompt_eval_duration": int((first - self.start) * ns),
                "eval_count": outcome.completion_tokens, "eval_duration": int((last - first) * ns)}


def done_reason(outcome: Outcome) -> str:
    return "length" if outcome.finish_reason == "length" else "stop"


def tool_calls(outcome: Outcome) -> tuple[list[dict[str, Any]], str]:
    """Ollama's tool_calls (arguments as an object), and the text of calls whose arguments do not
    parse (kept visible in the content, as the Anthropic route does)."""
    calls, text = [], ""
    for i, c in enumerate(outcome.tool_calls):
        if c.valid:
            calls.append({"id": c.id, "function": {"index": i, "name": c.name, "arguments": json.loads(c.arguments)}})
        else:
            text += f'{TOOL_OPEN}{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}{TOOL_CLOSE}'
    return calls, text


def ndjson_response(body: AsyncIterator[str], gen: Generation) -> StreamingResponse:
    return StreamingResponse(body, media_type=NDJSON, background=BackgroundTask(gen.close))


async def stream_chat(gen: Generation, model: str, clock: Clock) -> AsyncIterator[str]:
    async for d in gen.deltas():
        if d.content or d.reasoning:
            message: dict[str, Any] = {"role": "assistant", "content": d.content}
            if d.reasoning:
                message["thinking"] = d.reasoning
            yield line({"model": model, "created_at": now(), "message": message, "done": False})
    outcome = gen.outcome
    if outcome.error is not None:
        yield line(outcome.error.ollama_body())
        return
    calls, text = tool_calls(outcome)
    if calls or text:  # Ollama sends a call whole, once its arguments are complete
        message = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        yield line({"model": model, "created_at": now(), "message": message, "done": False})
    yield line({"model": model, "created_at": now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": done_reason(outcome), **clock.stats(outcome)})


def chat_answer(outcome: Outcome, model: str, clock: Clock) -> dict[str, Any]:
    calls, text = tool_calls(outcome)
    message: dict[str, Any] = {"role": "assistant", "content": outcome.content + text}
    if outcome.reasoning:
        message["thinking"] = outcome.reasoning
    if calls:
        message["tool_calls"] = calls
    return {"model": model, "created_at": now(), "message": message, "done": True,
            "done_reason": done_reason(outcome), **clock.stats(outcome)}


async def stream_generate(gen: Generation, model: str, clock: Clock, prompt_ids: list[int]) -> AsyncIterator[str]:
    async for d in gen.deltas():
        if d.content or d.reasoning:
            body: dict[str, Any] = {"model": model, "created_at": now(), "response": d.content, "done": False}
            if d.reasoning:
                body["thinking"] = d.reasoning
            yield line(body)
    outcome = gen.outcome
    if outcome.error is not None:
        yield line(outcome.error.ollama_body())
        return
    yield line({"model": model, "created_at": now(), "response": "", "done": True, "done_reason": done_reason(outcome),
                "context": prompt_ids + outcome.token_ids, **clock.stats(outcome)})


def generate_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def params(body: ChatRequest | GenerateRequest, prompt_ids: list[int]):
        return make_params(defaults=state.sampling_defaults, prompt_len=len(prompt_ids),
                           context_length=state.context_length, **sampling(body.options))

    @router.post("/api/chat", response_model=None, responses={
        200: {"model": ChatAnswer, "content": NDJSON_DOC}, **error_responses(*GENERATION_ERRORS, ollama=True)})
    async def chat(body: ChatRequest, request: Request) -> Any:
        """Ollama's chat: messages (and tools) in, the assistant's message out."""
        tokenizer = ready_for(state, body)
        if not body.messages:  # Ollama's way to load a model: nothing to generate
            return {"model": body.model, "created_at": now(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        clock = Clock()
        schema = format_schema(body)
        plan, prompt_ids, _ = await chat_prompt_ids(state, tokenizer, chat_messages(body), chat_tools(body), None,
                                                 template_kwargs(body), structured=schema is not None)
        grammar = await request_matcher(state, tokenizer, plan.tool_mode, schema, "format")
        gen = state.start_generation(GenerationRequest(prompt_ids, params(body, prompt_ids), prefill=plan.prefill,
                                                       tool_mode=plan.tool_mode, grammar=grammar,
                                                       start_in_reasoning=plan.start_in_reasoning))
        if body.stream:
            return ndjson_response(stream_chat(gen, body.model, clock), gen)
        outcome = await run_or_disconnect(request, gen)
        if outcome.error is not None:
            raise outcome.error
        return chat_answer(outcome, body.model, clock)

    @router.post("/api/generate", response_model=None, responses={
        200: {"model": GenerateAnswer, "content": NDJSON_DOC}, **error_responses(*GENERATION_ERRORS, ollama=True)})
    async def generate(body: GenerateRequest, request: Request) -> Any:
        """Ollama's completion: a prompt (through the chat template unless raw) in, text out."""
        tokenizer = ready_for(state, body)
        if not body.prompt and not body.context:
            return {"model": body.model, "created_at": now(), "response": "", "done": True, "done_reason": "load"}
        clock = Clock()
        schema = format_schema(body)
        if body.raw:
            prompt_ids = await text_prompt_ids(state, tokenizer, body.prompt, add_special_tokens=not body.context)
            plan = None
        else:
            plan, prompt_ids, _ = await chat_prompt_ids(state, tokenizer, generate_messages(body), None, None,
                                                     template_kwargs(body), param="prompt", check_fits=False,
                                                     structured=schema is not None)
        prompt_ids = list(body.context or []) + prompt_ids
        if any(t >= tokenizer.vocab_size for t in body.context or []):
            raise APIError(400, f"context holds token ids outside the vocabulary (size {tokenizer.vocab_size})",
                           param="context")
        check_prompt_fits(len(prompt_ids), state.context_length, "prompt")
        grammar = await request_matcher(state, tokenizer, None, schema, "format")
        gen = state.start_generation(GenerationRequest(
            prompt_ids, params(body, prompt_ids), parse_reasoning=plan is not None, grammar=grammar,
            start_in_reasoning=plan.start_in_reasoning if plan is not None else False))
        if body.stream:
            return ndjson_response(stream_generate(gen, body.model, clock, prompt_ids), gen)
        outcome = await run_or_disconnect(request, gen)
        if outcome.error is not None:
            raise outcome.error
        return JSONResponse({"model": body.model, "created_at": now(), "response": outcome.content,
                             **({"thinking": outcome.reasoning} if outcome.reasoning else {}),
                             "done": True, "done_reason": done_reason(outcome),
                             "context": prompt_ids + outcome.token_ids, **clock.stats(outcome)})

    return router
