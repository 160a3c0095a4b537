"""POST /v1/chat/completions: OpenAI's chat API, streamed (SSE) or whole."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from ...tokenizer.formats.tool_parser import ToolCallDelta
from ..common.errors import APIError
from ..core.generation import Delta, Generation, GenerationRequest, Outcome, TokenLogprob
from ..core.images import openai_images
from ..core.prompting import chat_prompt_ids
from ..core.sampling import make_params
from ..core.sse import DONE, run_or_disconnect, sse, sse_response, streamed_responses
from ..core.state import ServerState
from ..core.structured import request_matcher, response_format_schema
from .responses import ChatCompletion
from .schemas import ChatCompletionRequest, NamedToolChoice, SamplingFields


@dataclass
class ResponseMeta:
    id: str
    created: int
    model: str


def reject_unsupported(body: SamplingFields) -> None:
    """Fields we cannot honour are refused by name rather than silently ignored."""
    if body.n not in (None, 1):
        raise APIError(400, f"n must be 1 (one choice per request; send {body.n} requests instead)", param="n")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def usage(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def _logprob_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{**_logprob_entry(e.token, e.logprob),
                         "top_logprobs": [_logprob_entry(t, lp) for t, lp in e.top]} for e in entries]}


def _tool_delta(d: ToolCallDelta) -> dict[str, Any]:
    if d.id is not None:  # a call's first delta: id, type and name once
        return {"index": d.index, "id": d.id, "type": "function",
                "function": {"name": d.name, "arguments": d.arguments}}
    return {"index": d.index, "function": {"arguments": d.arguments}}


def _delta_json(d: Delta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if d.reasoning:
        out["reasoning_content"] = out["reasoning"] = d.reasoning
    if d.content:
        out["content"] = d.content
    if d.tool_calls:
        out["tool_calls"] = [_tool_delta(t) for t in d.tool_calls]
    return out


async def stream_chat(gen: Generation, meta: ResponseMeta, include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        body: dict[str, Any] = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                                "model": meta.model, "choices": [
                                    {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    yield chunk({"role": "assistant", "content": ""})
    async for d in gen.deltas():
        out = _delta_json(d)
        lp = chat_logprobs(d.logprobs) if logprobs and d.logprobs else None
        if out or lp:
            yield chunk(out, lp=lp)
    outcome = gen.outcome
    if outcome.error is not None:
        yield sse(outcome.error.openai_body())
        yield DONE
        return
    yield chunk({}, finish=outcome.finish_reason)
    if include_usage:
        yield sse({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                   "choices": [], "usage": usage(outcome)})
    yield DONE


def chat_response(outcome: Outcome, meta: ResponseMeta, logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": outcome.content}
    if outcome.reasoning:
        message["reasoning_content"] = message["reasoning"] = outcome.reasoning
    if outcome.tool_calls:
        message["content"] = outcome.content or None
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in outcome.tool_calls]
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": chat_logprobs(outcome.logprobs) if logprobs else None,
                         "finish_reason": outcome.finish_reason}],
            "usage": usage(outcome)}


def _tool_choice(body: ChatCompletionRequest) -> str | dict | None:
    if isinstance(body.tool_choice, NamedToolChoice):
        return {"name": body.tool_choice.function.name}
    return body.tool_choice


def chat_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", response_model=None, responses=streamed_responses(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        reject_unsupported(body)  # the body's own 400s first: they do not depend on the server's state
        tokenizer = state.tokenizer_for(body.model)
        schema = response_format_schema(body.response_format)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = openai_images([m.model_dump(exclude_none=True) for m in body.messages], state.config.images)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        plan, prompt_ids, media = await chat_prompt_ids(state, tokenizer, messages, tools, _tool_choice(body),
                                                        body.chat_template_kwargs, structured=schema is not None)
        grammar = await request_matcher(state, tokenizer, plan.tool_mode, schema)
        use_new = body.max_completion_tokens is not None
        params = make_params(
            defaults=state.sampling_defaults,
            prompt_len=len(prompt_ids), context_length=state.context_length,
            max_tokens=body.max_completion_tokens if use_new else body.max_tokens,
            max_tokens_field="max_completion_tokens" if use_new else "max_tokens",
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, stop=body.stop_list(),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None, logprobs_field="top_logprobs",
        )
        gen = state.start_generation(GenerationRequest(
            prompt_ids, params, prefill=plan.prefill, tool_mode=plan.tool_mode,
            start_in_reasoning=plan.start_in_reasoning, ignore_eos=body.ignore_eos, media=media, grammar=grammar,
        ))
        meta = ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
        want_lp = bool(body.logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(stream_chat(gen, meta, include_usage, want_lp), gen)
        outcome = await run_or_disconnect(request, gen)
        if outcome.error is not None:
            raise outcome.error
        return chat_response(outcome, meta, want_lp)

    return router
