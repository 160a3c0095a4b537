"""The one thread that owns the Engine: it loops ``step()`` and hands tokens to asyncio requests.

The engine is not thread-safe, so only this thread touches it. Requests and aborts arrive on a
thread-safe inbox and are applied between steps (sequences join and leave the batch at every
step); each step's tokens go to the owning request's asyncio queue via call_soon_threadsafe.

A failure never takes the loop down. A failing add or abort fails only its request. A failing
``step()`` is a batch failure whose culprit is unknown: every sequence in the batch is restarted
(re-added with prompt + tokens so far, same random generator), and restarts are let back in one
at a time; a step that fails while a restarted sequence is on probation (has not yet produced a
token) blames that one, and each request is restarted at most ``max_restarts`` times.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

from ...engine.engine import Engine, StepOutput
from ...engine.sampling_params import SamplingParams
from ...engine.sequence import Sequence
from ...errors import PromptTooLong
from ...models.media import Media
from ...tokenizer.grammar import Matcher

log = logging.getLogger("moemesh.server")


@dataclass
class TokenEvent:
    """One sampled token (or the end of a request) as the asyncio side sees it."""

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    time: float = 0.0  # perf_counter when the engine produced it
    error: str | None = None
    error_is_client: bool = False  # the request itself was bad (400), not the server (500)


class RequestHandle:
    """A request's link between the asyncio side and the engine thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 ignore_eos: bool = False, media: Media | None = None, grammar: Matcher | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.media = media
        self.params = params
        self.ignore_eos = ignore_eos
        self.grammar = grammar  # structured output; the engine thread alone advances it once submitted
        self.loop = loop
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.seq: Sequence | None = None  # engine thread only
        self.restarts = 0  # engine thread only

    def deliver(self, event: TokenEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class EngineLoop:
    def __init__(self, engine: Engine, max_restarts: int = 2) -> None:
        self._engine = engine
        self._max_restarts = max_restarts
        self._inbox: queue.SimpleQueue[tuple[str, RequestHandle | None]] = queue.SimpleQueue()
        self._owners: dict[int, RequestHandle] = {}  # seq_id -> handle
        self._held: list[RequestHandle] = []  # new requests kept out while restarts are probed
        self._retry: deque[RequestHandle] = deque()
        self._probation: RequestHandle | None = None
        self._thread = threading.Thread(target=self._run, name="moemesh-engine", daemon=True)
        self._stop = threading.Event()
        # Snapshots for /metrics, written by the engine thread only (int stores are atomic).
        self.num_running = 0
        self.num_waiting = 0
        self.steps = 0
        self.step_failures = 0
        self.cpu_seconds = 0.0  # this thread's CPU time: the engine's share of the server's CPU

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    def submit(self, handle: RequestHandle) -> None:
        self._inbox.put(("add", handle))

    def abort(self, handle: RequestHandle) -> None:
        self._inbox.put(("abort", handle))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception:  # a bug in this loop itself: log it and keep serving
                log.error("engine loop error:\n%s", traceback.format_exc())
                time.sleep(0.05)

    def _iterate(self) -> None:
        busy = self._engine.has_work() or bool(self._retry)
        self._drain(block=not busy)
        self._admit()
        if self._engine.has_work():
            self._step()
        self.num_running = len(self._engine.running)
        self.num_waiting = len(self._engine.waiting) + len(self._held) + len(self._retry)
        self.cpu_seconds = time.thread_time()

    def _drain(self, block: bool) -> None:
        try:
            kind, handle = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "add" and handle is not None:
                self._held.append(handle)
            elif kind == "abort" and handle is not None:
                self._abort(handle)
            try:
                kind, handle = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Let new requests in, unless a restarted one is on probation (keeps blame precise)."""
        if self._probation is None and self._retry:
            handle = self._retry.popleft()
            if self._add(handle, restart=True):
                self._probation = handle
        if self._probation is None and not self._retry:
            held, self._held = self._held, []
            for handle in held:
                self._add(handle, restart=False)

    def _add(self, handle: RequestHandle, restart: bool) -> bool:
        try:
            if restart:
                old = handle.seq
                assert old is not None
                params = dataclasses.replace(old.params, max_tokens=old.params.max_tokens - len(old.output_ids))
                # the grammar was advanced by every token in output_ids: it goes on from there
                seq = self._engine.add_request(old.prompt_ids + old.output_ids, params, media=old.media,
                                               grammar=old.grammar)
                seq.generator = old.generator  # a seeded request keeps its random stream
            else:
                seq = self._engine.add_request(handle.prompt_ids, handle.params, media=handle.media,
                                               grammar=handle.grammar)
            if handle.ignore_eos:
                seq.stop_token_ids = frozenset()
        except Exception as exc:
            client = isinstance(exc, (ValueError, PromptTooLong))
            self._fail(handle, exc, client)
            return False
        handle.seq = seq
        self._owners[seq.seq_id] = handle
        return True

    def _abort(self, handle: RequestHandle) -> None:
        if handle in self._held:
            self._held.remove(handle)
        if handle in self._retry:
            self._retry.remove(handle)
        if self._probation is handle:
            self._probation = None
        seq = handle.seq
        if seq is not None and self._owners.pop(seq.seq_id, None) is not None:
            self._engine.abort(seq)
            handle.deliver(TokenEvent(None, finished=True, finish_reason="abort", time=time.perf_counter()))

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:
            self._recover(exc)
            return
        self.steps += 1
        for out in outputs:
            if out.new_token is None:
                continue
            try:
                self._deliver(out)
            except Exception as exc:  # only this request's hand-off broke: end it, keep the rest
                handle = self._owners.pop(out.seq.seq_id, None)
                if handle is not None:
                    self._engine.abort(out.seq)
                    self._fail(handle, exc, client=False)

    def _deliver(self, out: StepOutput) -> None:
        handle = self._owners.get(out.seq.seq_id)
        if handle is None:
            return
        if handle is self._probation:
            self._probation = None  # it survived a step of its own
        seq = out.seq
        top = seq.output_top_logprobs[-1] if seq.params.logprobs is not None and seq.output_top_logprobs else None
        handle.deliver(TokenEvent(
            out.new_token, seq.output_logprobs[-1], top, out.finished,
            seq.finish_reason if out.finished else None, time.perf_counter(),
        ))
        if out.finished:
            self._owners.pop(seq.seq_id, None)

    def _recover(self, exc: Exception) -> None:
        self.step_failures += 1
        log.error("engine step failed; isolating the batch:\n%s", traceback.format_exc())
        suspects = [self._owners[s.seq_id] for s in list(self._engine.running) if s.seq_id in self._owners]
        if len(suspects) == 1:
            blamed = suspects[0]
        elif self._probation in suspects:
            blamed = self._probation
        else:
            blamed = None
        self._probation = None
        for handle in suspects:
            assert handle.seq is not None
            self._owners.pop(handle.seq.seq_id, None)
            self._engine.abort(handle.seq)
            if handle is blamed or handle.restarts >= self._max_restarts:
                self._fail(handle, exc, client=False)
            else:
                handle.restarts += 1
                self._retry.append(handle)
        # sequences the failed step dropped half-way (neither running nor waiting) cannot resume
        live = {s.seq_id for s in self._engine.running} | {s.seq_id for s in self._engine.waiting}
        for seq_id in [i for i in self._owners if i not in live]:
            self._fail(self._owners.pop(seq_id), exc, client=False)

    def _fail(self, handle: RequestHandle, exc: Exception, client: bool) -> None:
        message = str(exc) if client else f"generation failed: {type(exc).__name__}: {exc}"
        handle.deliver(TokenEvent(None, finished=True, finish_reason="error", time=time.perf_counter(),
                                  error=message, error_is_client=client))
