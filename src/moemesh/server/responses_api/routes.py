"""POST /v1/responses: OpenAI's Responses API, stateless, streamed (SSE events) or whole."""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ..common.errors import APIError
from ..core.generation import GenerationRequest
from ..core.prompting import chat_prompt_ids
from ..core.sampling import make_params
from ..core.sse import run_or_disconnect, sse_response, streamed_responses
from ..core.state import ServerState
from .convert import chat_messages, chat_tool_choice, chat_tools
from .render import ResponseMeta, output_items, response_object, status_of, stream_response
from .schemas import ResponsesRequest
from .shapes import Response


def _refuse_state(body: ResponsesRequest) -> None:
    """This server keeps no responses: a request that needs one stored gets a 400 saying so."""
    if body.previous_response_id is not None:
        raise APIError(400, "previous_response_id is not supported: this server is stateless; send the "
                       "earlier items (the response's output, then function_call_output items) in input",
                       param="previous_response_id")
    if body.conversation is not None:
        raise APIError(400, "conversation is not supported: this server is stateless; send the items in input",
                       param="conversation")
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        raise APIError(400, f"text.format {fmt.type!r} is not supported (only 'text')", param="text.format.type")


def _template_kwargs(body: ResponsesRequest) -> dict[str, Any] | None:
    effort = body.reasoning.effort if body.reasoning is not None else None
    return {"reasoning_effort": effort} if effort is not None else None


def responses_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/responses", response_model=None, responses=streamed_responses(Response))
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        """A model response (stateless: earlier turns come back as input items)."""
        tokenizer = state.tokenizer_for(body.model)
        _refuse_state(body)
        tools = chat_tools(body)
        plan, prompt_ids, _ = await chat_prompt_ids(state, tokenizer, chat_messages(body), tools,
                                                 chat_tool_choice(body.tool_choice), _template_kwargs(body),
                                                 param="input")
        params = make_params(
            defaults=state.sampling_defaults, prompt_len=len(prompt_ids), context_length=state.context_length,
            max_tokens=body.max_output_tokens, max_tokens_field="max_output_tokens", temperature=body.temperature,
            top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
            repetition_penalty=body.repetition_penalty,
        )
        gen = state.start_generation(GenerationRequest(prompt_ids, params, prefill=plan.prefill,
                                                       tool_mode=plan.tool_mode,
                                                       start_in_reasoning=plan.start_in_reasoning))
        choice = body.tool_choice
        meta = ResponseMeta(f"resp_{uuid.uuid4().hex}", int(time.time()), state.model_name, {
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": params.temperature, "top_p": params.top_p,
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "tool_choice": choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto"),
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": body.metadata or {},
        })
        if body.stream:
            return sse_response(stream_response(gen, meta), gen)
        outcome = await run_or_disconnect(request, gen)
        if outcome.error is not None:
            raise outcome.error
        return response_object(meta, status_of(outcome), output_items(outcome), outcome)

    return router
