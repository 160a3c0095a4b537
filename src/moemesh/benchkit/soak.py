"""A bounded loopback load generator for soak runs of ``moemesh serve`` (bench/soak.py, tests/test_soak.py).

Worker threads loop over a seeded mix of requests: plain and streamed chat, tool calls, legacy
completions, Anthropic messages (plain and streamed), prompts longer than the context window, bad
bodies, and clients that leave mid-stream; every ``burst_every`` seconds a burst of simultaneous
requests goes past the server's queue. The server's RSS is sampled every few seconds.

Every answer is classified. Explained outcomes: the expected success of its kind, a 400 where the
kind asks for one (overlong, bad), a 429 (the server said "busy"), a disconnect the client chose.
Anything else (a 5xx, another status, a refused or reset connection, a timeout, a stream that ends
without its final event) is unexplained, and counted by kind.
"""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .soak_report import KINDS, Outcome, SoakReport

EXPECTED = {"overlong": 400, "bad": 400}  # every other kind expects 200
# a forced tool call the model did not write validly is refused by name (422 invalid_tool_call)
ALSO_EXPLAINED = {"tools": 422}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOPICS = ("the sea", "a cat", "Paris", "robots", "winter", "coffee", "a lighthouse", "the moon")


@dataclass(frozen=True)
class SoakConfig:
    duration: float = 60.0  # seconds of load
    workers: int = 4  # concurrent clients
    burst_every: float = 15.0  # seconds between bursts past the queue (0: none)
    burst_size: int = 12  # simultaneous requests of a burst (more than the server's --queue-size)
    sample_every: float = 2.0  # seconds between RSS samples
    max_tokens: int = 16
    timeout: float = 120.0  # a request still unanswered after this is a hang
    seed: int = 0
    api_key: str | None = None


def is_error_event(event: Any) -> bool:
    """An SSE data object that reports an error: OpenAI's ``{"error": {...}}``, Anthropic's
    ``{"type": "error", ...}``. Matching the bytes ``"error"`` instead also caught a streamed token
    that reads "error" (``{"content": "error"}``): the soak's "unexplained" stream errors."""
    return isinstance(event, dict) and ("error" in event or event.get("type") == "error")


def _clip(data: bytes, limit: int = 600) -> str:
    return data[:limit].decode("utf-8", "replace")


def _tail(seen: list[bytes], limit: int = 600) -> str:
    """The last ``limit`` bytes read (a truncated stream's end, or a body cut short)."""
    return b"".join(seen)[-limit:].decode("utf-8", "replace")


def read_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Soak:
    """Load against ``host:port`` (loopback) whose server process is ``pid``; run() blocks for the duration."""

    def __init__(self, host: str, port: int, pid: int, context_length: int, config: SoakConfig) -> None:
        self.host, self.port, self.pid = host, port, pid
        self.context_length = context_length
        self.config = config
        self.report = SoakReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self) -> SoakReport:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._worker, args=(i, t0), daemon=True) for i in range(self.config.workers)]
        threads.append(threading.Thread(target=self._sampler, args=(t0,), daemon=True))
        if self.config.burst_every > 0:
            threads.append(threading.Thread(target=self._bursts, args=(t0,), daemon=True))
        for t in threads:
            t.start()
        self._stop.wait(self.config.duration)
        self._stop.set()
        for t in threads:
            t.join(self.config.timeout + 10)
        self.report.seconds = time.monotonic() - t0
        return self.report

    # -- threads -----------------------------------------------------------------------------------
    def _worker(self, index: int, t0: float) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        while not self._stop.is_set():
            kind = rng.choice(KINDS)
            self._record(self._request(kind, rng))

    def _sampler(self, t0: float) -> None:
        while True:
            rss = read_rss(self.pid)
            gauges = self._gauges(("moemesh_prefix_cache_pool_bytes", "moemesh_prefix_cache_capacity_bytes"))
            with self._lock:
                now = time.monotonic() - t0
                if rss is not None:
                    self.report.rss.append((now, rss))
                if "moemesh_prefix_cache_pool_bytes" in gauges:  # the memory its blocks take
                    self.report.prefix.append((now, int(gauges["moemesh_prefix_cache_pool_bytes"])))
                    self.report.prefix_capacity = int(gauges.get("moemesh_prefix_cache_capacity_bytes", 0))
            if self._stop.wait(self.config.sample_every):
                return

    def _gauges(self, names: tuple[str, ...]) -> dict[str, float]:
        """Values of unlabelled-but-for-model gauges from /metrics ({} when it does not answer)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            return {}
        finally:
            conn.close()
        out = {}
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in names:
                out[name] = float(line.rsplit(" ", 1)[1])
        return out

    def _bursts(self, t0: float) -> None:
        while not self._stop.wait(self.config.burst_every):
            gate = threading.Barrier(self.config.burst_size)
            rng = random.Random(self.config.seed + int(time.monotonic() - t0))

            def one() -> None:
                try:
                    gate.wait(10)
                except threading.BrokenBarrierError:
                    return
                self._record(self._request("chat", rng))

            burst = [threading.Thread(target=one, daemon=True) for _ in range(self.config.burst_size)]
            for t in burst:
                t.start()
            for t in burst:
                t.join(self.config.timeout + 10)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.report.outcomes.append(outcome)

    # -- one request -------------------------------------------------------------------------------
    def _request(self, kind: str, rng: random.Random) -> Outcome:
        path, body, stream = self._body(kind, rng)
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.config.timeout)
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        status: int | None = None
        seen: list[bytes] = []  # what was read so far: the detail of an unexplained outcome
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            category, detail = self._read(kind, resp, stream, status, seen)
        except TimeoutError as exc:
            category, detail = "timeout", f"{type(exc).__name__}: {exc}; read: {_tail(seen)}"
        except (OSError, http.client.HTTPException) as exc:
            category, detail = "connection", f"{type(exc).__name__}: {exc}; read: {_tail(seen)}"
        except ValueError as exc:  # an answer that is not the JSON it should be
            category, detail = "bad_json", f"{type(exc).__name__}: {exc}; read: {_tail(seen)}"
        finally:
            conn.close()
        return Outcome(kind, category, time.monotonic() - t0, status, detail)

    def _read(self, kind: str, resp: http.client.HTTPResponse, stream: bool, status: int,
              seen: list[bytes]) -> tuple[str, str]:
        def body() -> bytes:
            seen.append(resp.read())
            return seen[-1]

        if status == 429:
            body()
            return "queue_full", ""
        if status >= 500:
            return "server_error", _clip(body())
        expected = EXPECTED.get(kind, 200)
        if status == ALSO_EXPLAINED.get(kind):
            return ("rejected", "") if "error" in json.loads(body()) else (f"status_{status}", _clip(seen[-1]))
        if status != expected:
            return f"status_{status}", _clip(body())
        if status != 200:
            return ("rejected", "") if "error" in json.loads(body()) else (f"status_{status}", _clip(seen[-1]))
        if kind == "disconnect":
            resp.readline()  # the first event line, then hang up mid-stream
            return "left", ""
        if not stream:
            json.loads(body())
            return "ok", ""
        seen_final = False
        for line in resp:
            seen.append(line)
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":  # OpenAI's end
                seen_final = True
                continue
            event = json.loads(data)
            if is_error_event(event):
                return "server_error", _clip(line)  # an error event inside the stream
            seen_final |= isinstance(event, dict) and event.get("type") == "message_stop"  # Anthropic's end
        return ("ok", "") if seen_final else ("truncated", f"no final event; read: {_tail(seen)}")

    def _body(self, kind: str, rng: random.Random) -> tuple[str, bytes, bool]:
        ask = [{"role": "user", "content": f"Write one sentence about {rng.choice(TOPICS)}."}]
        n = self.config.max_tokens
        chat: dict[str, Any] = {"messages": ask, "max_tokens": n, "temperature": rng.choice([0, 0.7])}
        anthropic: dict[str, Any] = {"messages": ask, "max_tokens": n}
        make: dict[str, Callable[[], tuple[str, dict | bytes, bool]]] = {
            "chat": lambda: ("/v1/chat/completions", chat, False),
            "chat_stream": lambda: ("/v1/chat/completions", {**chat, "stream": True}, True),
            "tools": lambda: ("/v1/chat/completions", {**chat, "tools": [WEATHER],
                                                       "tool_choice": rng.choice(["auto", "required"])}, False),
            "completion": lambda: ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": n}, False),
            "anthropic": lambda: ("/v1/messages", anthropic, False),
            "anthropic_stream": lambda: ("/v1/messages", {**anthropic, "stream": True}, True),
            "overlong": lambda: ("/v1/chat/completions", {
                "messages": [{"role": "user", "content": "hello " * (2 * self.context_length)}], "max_tokens": n}, False),
            "bad": lambda: ("/v1/chat/completions", rng.choice([b"", b"[]", b'{"messages": [', json.dumps(
                {"messages": ask, "temperature": -1}).encode()]), False),
            "disconnect": lambda: ("/v1/chat/completions", {**chat, "stream": True, "max_tokens": 4 * n,
                                                            "ignore_eos": True}, True),
        }
        path, body, stream = make[kind]()
        return path, body if isinstance(body, bytes) else json.dumps(body).encode(), stream
