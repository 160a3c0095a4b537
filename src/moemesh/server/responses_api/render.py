"""A generation as a Responses API answer: one Response object, or its stream of events
(response.created, response.in_progress, then per output item output_item.added, its parts and
deltas (output_text / reasoning_text / function_call_arguments), output_item.done, and finally
response.completed, response.incomplete (max_output_tokens reached) or response.failed)."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..core.generation import Delta, Generation, Outcome
from ..core.sse import sse


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponseMeta:
    """The request-side fields every Response object repeats."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]  # instructions, max_output_tokens, temperature, top_p, tools, tool_choice ...


def usage(outcome: Outcome) -> dict[str, Any]:
    return {"input_tokens": outcome.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": outcome.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def response_object(meta: ResponseMeta, status: str, output: list[dict[str, Any]], outcome: Outcome | None,
                    error: dict[str, Any] | None = None) -> dict[str, Any]:
    incomplete = status == "incomplete"
    return {"id": meta.id, "object": "response", "created_at": meta.created_at, "status": status,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "model": meta.model, "output": output, "previous_response_id": None, "store": False,
            **meta.echo, "usage": usage(outcome) if outcome is not None else None}


def status_of(outcome: Outcome) -> str:
    return "incomplete" if outcome.finish_reason == "length" else "completed"


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(outcome: Outcome) -> list[dict[str, Any]]:
    """The output of a whole (non-streamed) answer: reasoning, the text, then the calls. A call
    whose arguments do not parse is still reported (the client sees what the model wrote)."""
    status = status_of(outcome)
    items = []
    if outcome.reasoning:
        items.append(_reasoning(_id("rs"), outcome.reasoning, status))
    if outcome.content or not outcome.tool_calls:
        items.append(_message(_id("msg"), outcome.content, status))
    items += [_call(_id("fc"), c.id, c.name, c.arguments, "completed") for c in outcome.tool_calls]
    return items


@dataclass
class _Open:
    """The output item being streamed."""

    kind: str  # message | reasoning | function_call
    item: dict[str, Any]
    index: int
    text: list[str] = field(default_factory=list)


class _Events:
    def __init__(self) -> None:
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # finished output items
        self.open: _Open | None = None

    def event(self, kind: str, body: dict[str, Any]) -> str:
        out = sse({"type": kind, "sequence_number": self.seq, **body}, kind)
        self.seq += 1
        return out

    def start(self, kind: str, item: dict[str, Any]) -> list[str]:
        events = self.close("completed")
        self.open = _Open(kind, item, len(self.items))
        events.append(self.event("response.output_item.added", {"output_index": self.open.index, "item": item}))
        part = {"message": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                "reasoning": {"type": "reasoning_text", "text": ""}}.get(kind)
        if part is not None:
            events.append(self.event("response.content_part.added", {
                "item_id": item["id"], "output_index": self.open.index, "content_index": 0, "part": part}))
        return events

    def delta(self, kind: str, text: str) -> str:
        assert self.open is not None
        self.open.text.append(text)
        where = {"item_id": self.open.item["id"], "output_index": self.open.index}
        if kind == "function_call":
            return self.event("response.function_call_arguments.delta", {**where, "delta": text})
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        return self.event(name, {**where, "content_index": 0, "delta": text, **extra})

    def close(self, status: str) -> list[str]:
        o, self.open = self.open, None
        if o is None:
            return []
        text = "".join(o.text)
        where = {"item_id": o.item["id"], "output_index": o.index}
        events = []
        if o.kind == "function_call":
            item = _call(o.item["id"], o.item["call_id"], o.item["name"], text, "completed")
            events.append(self.event("response.function_call_arguments.done",
                                     {**where, "name": item["name"], "arguments": text}))
        else:
            item = (_message if o.kind == "message" else _reasoning)(o.item["id"], text, status)
            part = item["content"][0]
            name = "response.output_text.done" if o.kind == "message" else "response.reasoning_text.done"
            extra = {"logprobs": []} if o.kind == "message" else {}
            events.append(self.event(name, {**where, "content_index": 0, "text": text, **extra}))
            events.append(self.event("response.content_part.done", {**where, "content_index": 0, "part": part}))
        events.append(self.event("response.output_item.done", {"output_index": o.index, "item": item}))
        self.items.append(item)
        return events

    def feed(self, d: Delta) -> list[str]:
        events: list[str] = []
        if d.reasoning:
            if self.open is None or self.open.kind != "reasoning":
                events += self.start("reasoning", _reasoning(_id("rs"), "", "in_progress"))
            events.append(self.delta("reasoning", d.reasoning))
        if d.content:
            if self.open is None or self.open.kind != "message":
                events += self.start("message", {**_message(_id("msg"), "", "in_progress"), "content": []})
            events.append(self.delta("message", d.content))
        for t in d.tool_calls:
            if t.id is not None:
                events += self.start("function_call", _call(_id("fc"), t.id, t.name or "", "", "in_progress"))
            if t.arguments and self.open is not None and self.open.kind == "function_call":
                events.append(self.delta("function_call", t.arguments))
        return events


async def stream_response(gen: Generation, meta: ResponseMeta) -> AsyncIterator[str]:
    ev = _Events()
    yield ev.event("response.created", {"response": response_object(meta, "in_progress", [], None)})
    yield ev.event("response.in_progress", {"response": response_object(meta, "in_progress", [], None)})
    async for d in gen.deltas():
        for e in ev.feed(d):
            yield e
    outcome = gen.outcome
    if outcome.error is not None:
        for e in ev.close("incomplete"):
            yield e
        err = {"code": outcome.error.code or "server_error", "message": outcome.error.message}
        yield ev.event("response.failed", {"response": response_object(meta, "failed", ev.items, outcome, err)})
        return
    status = status_of(outcome)
    if not ev.items and ev.open is None:  # an empty answer is still one (empty) message
        for e in ev.start("message", {**_message(_id("msg"), "", "in_progress"), "content": []}):
            yield e
    for e in ev.close(status):
        yield e
    kind = "response.completed" if status == "completed" else "response.incomplete"
    yield ev.event(kind, {"response": response_object(meta, status, ev.items, outcome)})
