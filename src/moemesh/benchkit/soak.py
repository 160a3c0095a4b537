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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("chat", "chat_stream", "tools", "completion", "anthropic", "anthropic_stream", "overlong", "bad", "disconnect")
EXPECTED = {"overlong": 400, "bad": 400}  # every other kind expects 200
# a forced tool call the model did not write validly is refused by name (422 invalid_tool_call)
ALSO_EXPLAINED = {"tools": 422}
EXPLAINED = frozenset({"ok", "queue_full", "rejected", "left"})
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


@dataclass
class Outcome:
    kind: str
    category: str  # ok | queue_full | rejected | left | server_error | status_NNN | connection | timeout | truncated
    seconds: float
    status: int | None = None


@dataclass
class SoakReport:
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    seconds: float = 0.0

    def unexplained(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.category not in EXPLAINED]

    def summary(self, warmup: float) -> dict[str, Any]:
        by_kind = {k: dict(Counter(o.category for o in self.outcomes if o.kind == k)) for k in KINDS}
        ok = sorted(o.seconds for o in self.outcomes if o.category == "ok")
        rss = [b for _, b in self.rss]
        return {
            "seconds": round(self.seconds, 1), "requests": len(self.outcomes),
            "outcomes": dict(Counter(o.category for o in self.outcomes)), "by_kind": by_kind,
            "unexplained": len(self.unexplained()),
            "unexplained_by_kind": dict(Counter(f"{o.kind}:{o.category}" for o in self.unexplained())),
            "latency_ok_s": {"p50": percentile(ok, 50), "p99": percentile(ok, 99), "n": len(ok)},
            "rss_mib": {"start": mib(rss[0]) if rss else None, "end": mib(rss[-1]) if rss else None,
                        "max": mib(max(rss)) if rss else None, "samples": len(rss)},
            "rss_slope": rss_slope(self.rss, warmup),
        }


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return round(sorted_values[i], 4)


def rss_slope(samples: list[tuple[float, int]], warmup: float) -> dict[str, float | None]:
    """Least-squares RSS slope after ``warmup`` seconds: MiB per hour, and percent of the mean per hour."""
    pts = [(t, b) for t, b in samples if t >= warmup]
    if len(pts) < 3:
        return {"mib_per_hour": None, "percent_per_hour": None, "after_s": warmup}
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mb = sum(b for _, b in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    slope = sum((t - mt) * (b - mb) for t, b in pts) / var if var else 0.0  # bytes per second
    return {"mib_per_hour": round(slope * 3600 / 2**20, 2), "percent_per_hour": round(100 * slope * 3600 / mb, 2),
            "after_s": warmup}


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
            if rss is not None:
                with self._lock:
                    self.report.rss.append((time.monotonic() - t0, rss))
            if self._stop.wait(self.config.sample_every):
                return

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
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            category = self._read(kind, resp, stream, status)
        except TimeoutError:
            category, status = "timeout", None
        except (OSError, http.client.HTTPException):
            category, status = "connection", None
        finally:
            conn.close()
        return Outcome(kind, category, time.monotonic() - t0, status)

    def _read(self, kind: str, resp: http.client.HTTPResponse, stream: bool, status: int) -> str:
        if status == 429:
            resp.read()
            return "queue_full"
        if status >= 500:
            resp.read()
            return "server_error"
        expected = EXPECTED.get(kind, 200)
        if status == ALSO_EXPLAINED.get(kind):
            body = json.loads(resp.read())
            return "rejected" if "error" in body else f"status_{status}"
        if status != expected:
            resp.read()
            return f"status_{status}"
        if status != 200:
            body = json.loads(resp.read())
            return "rejected" if "error" in body else f"status_{status}"
        if kind == "disconnect":
            resp.readline()  # the first event line, then hang up mid-stream
            return "left"
        if not stream:
            json.loads(resp.read())
            return "ok"
        final = b"message_stop" if kind.startswith("anthropic") else b"data: [DONE]"
        seen_final = False
        for line in resp:
            if b'"error"' in line and line.startswith(b"data:"):
                return "server_error"  # an error event inside the stream
            seen_final |= line.startswith(final) or (final == b"message_stop" and b'"message_stop"' in line)
        return "ok" if seen_final else "truncated"

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


def markdown(summary: dict[str, Any], title: str) -> str:
    s = summary
    lines = [f"# {title}", "", f"{s['requests']} requests in {s['seconds']} s; unexplained: {s['unexplained']}",
             "", "| kind | outcomes |", "|---|---|"]
    for kind, outcomes in s["by_kind"].items():
        lines.append(f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))} |")
    lat, rss, slope = s["latency_ok_s"], s["rss_mib"], s["rss_slope"]
    lines += ["", f"latency of successful requests: p50 {lat['p50']} s, p99 {lat['p99']} s ({lat['n']} requests)",
              f"RSS: start {rss['start']} MiB, end {rss['end']} MiB, max {rss['max']} MiB ({rss['samples']} samples); "
              f"slope after {slope['after_s']:g} s: {slope['mib_per_hour']} MiB/h ({slope['percent_per_hour']} %/h)", ""]
    return "\n".join(lines)
