"""One request's generation on the asyncio side: engine tokens -> text -> stop strings ->
reasoning -> tool calls, as deltas that the OpenAI and Anthropic routes render in their shapes.
"""
from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ...engine.sampling_params import SamplingParams
from ...models.media import Media
from ...tokenizer.detok import IncrementalDetokenizer
from ...tokenizer.formats import tool_formats
from ...tokenizer.formats.chat_prompt import ToolMode
from ...tokenizer.formats.deepseek_chat import writes_deepseek_tools
from ...tokenizer.formats.deepseek_tools import DeepSeekToolStream
from ...tokenizer.formats.harmony import HarmonyStream, is_harmony
from ...tokenizer.formats.reasoning import ReasoningStream
from ...tokenizer.formats.tool_parser import ToolCall, ToolCallDelta, ToolCallStream
from ...tokenizer.grammar import Matcher
from ...tokenizer.tokenizer import Tokenizer
from ..common.errors import APIError
from .admission import Slot
from .engine_loop import EngineLoop, RequestHandle, TokenEvent
from .metrics import Metrics
from .stop_strings import StopMatcher

log = logging.getLogger("moemesh.server")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    prefill: str = ""  # text at the end of the prompt that the parsers must read as model output
    tool_mode: ToolMode | None = None  # None: tool calls are not parsed
    start_in_reasoning: bool = False
    parse_reasoning: bool = True  # split <think>...</think> out (chat); raw completions keep it
    ignore_eos: bool = False
    tool_id_prefix: str = "call_"
    media: Media | None = None  # the prompt's images (their tokens are in prompt_ids)
    grammar: Matcher | None = None  # structured output (server/core/structured.py); the engine masks by it


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.logprobs)


@dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | tool_calls | abort | error
    stop_sequence: str | None = None
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # what the model generated (Ollama returns it as context)
    first_token_time: float | None = None  # time.perf_counter() when the first and the last token came
    last_token_time: float | None = None
    error: APIError | None = None


class Generation:
    """Create on the event loop, start(), then iterate deltas() once; outcome is final after."""

    def __init__(self, request: GenerationRequest, engine_loop: EngineLoop, tokenizer: Tokenizer,
                 metrics: Metrics, slot: Slot) -> None:
        self._request = request
        self._engine_loop = engine_loop
        self._tokenizer = tokenizer
        self._metrics = metrics
        self._slot = slot
        self.handle = RequestHandle(request.prompt_ids, request.params, asyncio.get_running_loop(),
                                    request.ignore_eos, request.media, request.grammar)
        # gpt-oss: Harmony channels are special tokens, so they stay in the text for its parser
        self._harmony = HarmonyStream(request.tool_id_prefix) if (
            request.parse_reasoning and is_harmony(tokenizer)) else None
        # GLM / MiniMax / Kimi tool calls (tool_formats.py): their markers stay in the text even when special
        fmt = tool_formats.format_of(tokenizer.chat_template) if request.tool_mode else None
        decoder = tool_formats.KeepMarkers(tokenizer, fmt) if fmt else tokenizer
        self._detok = IncrementalDetokenizer(decoder, request.prompt_ids, skip_special_tokens=self._harmony is None)
        self._stop = StopMatcher(request.params.stop)
        self._reasoning = ReasoningStream(request.start_in_reasoning) if request.parse_reasoning else None
        self._tools = None
        if request.tool_mode and self._harmony is not None:
            self._tools = self._harmony  # one parser for channels and calls
        elif request.tool_mode and fmt:
            self._tools = tool_formats.make_stream(fmt, request.tool_id_prefix, list(request.tool_mode.tools))
        elif request.tool_mode:  # DeepSeek's format when the model writes it, else Hermes
            stream = DeepSeekToolStream if writes_deepseek_tools(tokenizer) else ToolCallStream
            self._tools = stream(request.tool_id_prefix)
        self.outcome = Outcome(prompt_tokens=len(request.prompt_ids))
        self._ended_by: str | None = None  # finish reason when we ended it (stop string, forced call)
        self._engine_done = False
        self._closed = False
        self._arrival = time.perf_counter()
        self._last_token_time: float | None = None
        self._pending = Delta()
        if request.prefill and self._harmony is not None:
            self._pending.tool_calls = self._harmony.feed(request.prefill)[2]
        elif request.prefill and self._tools is not None:  # e.g. the forced `{"name": ...` head
            _, self._pending.tool_calls = self._tools.feed(request.prefill)

    def start(self) -> None:
        self._engine_loop.submit(self.handle)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas as the engine produces tokens; afterwards ``outcome`` is final (``error`` set if
        this request failed: a bug here fails only this request, as an error the client sees)."""
        try:
            while not self._engine_done and self._ended_by is None:
                delta = self._take_pending()
                self._on_event(await self.handle.events.get(), delta)
                if delta:
                    yield delta
            delta = self._take_pending()
            self._flush(delta)
            if delta:
                yield delta
            self._finalize()
        except Exception as exc:  # not CancelledError/GeneratorExit: a client leaving is not an error
            log.error("request failed:\n%s", traceback.format_exc())
            self.outcome.finish_reason = "error"
            self.outcome.error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            self.close()

    async def run(self) -> Outcome:
        """Run to the end without streaming."""
        async for _ in self.deltas():
            pass
        return self.outcome

    def close(self) -> None:
        """Stop the sequence if it still runs, free the admission slot, record metrics; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._engine_done:
            self._engine_loop.abort(self.handle)
            if self._ended_by is None:
                self.outcome.finish_reason = "abort"  # the client went away
        self._slot.release()
        m = self._metrics
        m.prompt_tokens += self.outcome.prompt_tokens
        m.generation_tokens += self.outcome.completion_tokens
        m.finished[self.outcome.finish_reason] += 1
        m.e2e.observe(time.perf_counter() - self._arrival)

    def _take_pending(self) -> Delta:
        delta, self._pending = self._pending, Delta()
        return delta

    def _on_event(self, event: TokenEvent, delta: Delta) -> None:
        if event.error is not None:
            self._engine_done = True
            self.outcome.finish_reason = "error"
            self.outcome.error = APIError(400 if event.error_is_client else 500, event.error)
            return
        if event.token is not None:
            self._on_token(event, delta)
        if event.finished:
            self._engine_done = True
            if self._ended_by is None:
                self.outcome.finish_reason = event.finish_reason or "stop"

    def _on_token(self, event: TokenEvent, delta: Delta) -> None:
        assert event.token is not None
        self.outcome.completion_tokens += 1
        self.outcome.token_ids.append(event.token)
        if self._last_token_time is None:
            self._metrics.ttft.observe(event.time - self._arrival)
        else:
            self._metrics.itl.observe(event.time - self._last_token_time)
        self._last_token_time = event.time
        self.outcome.first_token_time = self.outcome.first_token_time or event.time
        self.outcome.last_token_time = event.time
        if self._request.params.logprobs is not None:
            entry = TokenLogprob(self._tokenizer.decode([event.token]), event.logprob or 0.0,
                                 [(self._tokenizer.decode([t]), lp) for t, lp in event.top_logprobs or []])
            delta.logprobs.append(entry)
            self.outcome.logprobs.append(entry)
        if event.finished and event.finish_reason == "stop":
            return  # the end-of-turn token: not part of the text
        self._text(self._detok.add(event.token), delta)

    def _text(self, text: str, delta: Delta) -> None:
        if self._ended_by is not None:
            return
        visible = self._stop.feed(text)
        if self._stop.matched is not None:
            self._end("stop")
            self.outcome.stop_sequence = self._stop.matched
        self._route(visible, delta)

    def _route(self, text: str, delta: Delta, final: bool = False) -> None:
        if self._harmony is not None:
            self._route_harmony(text, delta, final)
            return
        reasoning, content = self._reasoning.feed(text) if self._reasoning is not None else ("", text)
        if final and self._reasoning is not None:
            r2, c2 = self._reasoning.flush()
            reasoning, content = reasoning + r2, content + c2
        if self._tools is not None:
            content, calls = self._tools.feed(content)
            if final:
                c2, more = self._tools.finish()
                content, calls = content + c2, calls + more
            delta.tool_calls += calls
            mode = self._request.tool_mode
            if mode is not None and mode.forced and self._tools.complete_calls and self._ended_by is None:
                self._end("tool_calls")  # one complete forced call is the whole answer
        delta.reasoning += reasoning
        delta.content += content
        self.outcome.reasoning += reasoning
        self.outcome.content += content

    def _route_harmony(self, text: str, delta: Delta, final: bool) -> None:
        assert self._harmony is not None
        reasoning, content, calls = self._harmony.feed(text)
        if final:
            r2, c2, more = self._harmony.finish()
            reasoning, content, calls = reasoning + r2, content + c2, calls + more
        mode = self._request.tool_mode
        if mode is not None:  # without tools offered, calls are not reported
            delta.tool_calls += calls
            if mode.forced and self._harmony.complete_calls and self._ended_by is None:
                self._end("tool_calls")
        delta.reasoning += reasoning
        delta.content += content
        self.outcome.reasoning += reasoning
        self.outcome.content += content

    def _end(self, reason: str) -> None:
        self._ended_by = reason
        self.outcome.finish_reason = reason
        if not self._engine_done:
            self._engine_loop.abort(self.handle)
            self._engine_done = True

    def _flush(self, delta: Delta) -> None:
        text = ""
        if self._ended_by is None and self.outcome.error is None:
            text = self._stop.feed(self._detok.flush())
            if self._stop.matched is not None:
                self._end("stop")
                self.outcome.stop_sequence = self._stop.matched
            text += self._stop.flush()
        self._route(text, delta, final=True)

    def _finalize(self) -> None:
        out = self.outcome
        if self._tools is None or out.error is not None:
            return
        out.tool_calls = list(self._tools.calls)
        mode = self._request.tool_mode
        assert mode is not None
        if mode.forced:
            good = [c for c in out.tool_calls if c.valid and c.name in mode.names]
            wanted = mode.name if mode.kind == "named" else "one of " + ", ".join(sorted(mode.names))
            if not good:
                raw = self._tokenizer.decode(self.outcome.token_ids, skip_special_tokens=True)
                out.finish_reason = "error"
                out.error = APIError(
                    422, f"tool_choice demands a call to {wanted}, but the model did not produce a valid one "
                    f"(finish_reason {self._ended_by or 'stop'}): {self._request.prefill + raw!r}",
                    code="invalid_tool_call", type="model_output_error",
                )
                return
            out.tool_calls = good
            out.finish_reason = "tool_calls"
        elif out.tool_calls and out.finish_reason == "stop" and out.stop_sequence is None:
            out.finish_reason = "tool_calls"
