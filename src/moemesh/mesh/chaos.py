"""Chaos on a loopback mesh (issue 20 item 5; bench/chaos.py, tests/test_chaos.py).

A 3-node mesh as child processes: an API node serving layers 0:H and two replicas of layers H:L.
Loopback clients send greedy completions while a seeded chaos thread, at random intervals, kills a
replica with SIGKILL (restarted a few seconds later), freezes one with SIGSTOP (SIGCONT later) or
restarts one gracefully. Every request must end as one of:

- ``completed``: 200, and its text equals what a one-process ``moemesh serve`` answered (else ``wrong``);
- ``failed_cleanly``: an HTTP error with the API's error body (say, "no other live node" while every
  replica is down);
- ``hung``: no answer within ``hang_after`` seconds (goal: none);
- ``unclear``: anything else (a reset connection, a body without an error message; goal: none).
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from .launcher import MeshProcess, StageProcess

PROMPTS = ["Hello there", "The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def main():",
           "The quick brown fox", "In a hole in the ground", "Mixture of experts models"]


@dataclass
class ChaosConfig:
    model: str
    duration: float = 60.0  # seconds of load under chaos
    seed: int = 0
    workers: int = 2
    max_tokens: int = 8
    interval: tuple[float, float] = (4.0, 9.0)  # seconds between chaos events
    down: tuple[float, float] = (2.0, 6.0)  # seconds a killed node stays dead / a frozen one stays stopped
    hang_after: float = 120.0  # a request without an answer after this long is hung
    call_timeout: float = 3.0
    split: str = "2"  # the API node serves layers 0:split, each replica split:end
    layers: int = 4
    secret: str = "chaos-secret"


@dataclass
class ChaosReport:
    events: Counter = field(default_factory=Counter)  # kill9, restart (after a kill), stop, cont, graceful_restart
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # failed_cleanly messages, shortened
    wrong: list = field(default_factory=list)
    unclear: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"seconds": round(self.seconds, 1), "events": dict(self.events), "requests": sum(self.outcomes.values()),
                "outcomes": {k: self.outcomes.get(k, 0) for k in ("completed", "failed_cleanly", "hung", "wrong", "unclear")},
                "errors": dict(self.errors.most_common(8)), "wrong_examples": self.wrong[:3],
                "unclear_examples": self.unclear[:3]}


def complete(url: str, prompt: str, max_tokens: int, timeout: float) -> tuple[str, str]:
    """(outcome, detail): ('ok', text) | ('error', message) | ('hung', '') | ('unclear', what)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return "ok", json.load(r)["choices"][0]["text"]
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return "unclear", f"HTTP {e.code} without an error body"
        return ("error", message) if message else ("unclear", f"HTTP {e.code} with an empty message")
    except TimeoutError:
        return "hung", ""
    except (urllib.error.URLError, OSError, ValueError) as e:
        if "timed out" in str(e):
            return "hung", ""
        return "unclear", f"{type(e).__name__}: {e}"


def reference_answers(url: str, cfg: ChaosConfig) -> dict[str, str]:
    out = {}
    for p in PROMPTS:
        kind, text = complete(url, p, cfg.max_tokens, 120)
        if kind != "ok":
            raise RuntimeError(f"the one-process server did not answer {p!r}: {kind} {text}")
        out[p] = text
    return out


class Chaos:
    def __init__(self, cfg: ChaosConfig, reference: dict[str, str]) -> None:
        self.cfg, self.reference = cfg, reference
        self.report = ChaosReport()
        self.api: MeshProcess | None = None
        self.replicas: list[StageProcess] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _common(self) -> tuple[str, ...]:
        return ("--quant", "fp32", "--threads", "1", "--heartbeat", "1", "--call-timeout", str(self.cfg.call_timeout))

    def _replica(self) -> StageProcess:
        assert self.api is not None and self.api.addr is not None
        return StageProcess(self.cfg.model, f"{self.cfg.split}:{self.cfg.layers}", self.cfg.secret, [self.api.addr],
                            *self._common(), mesh_name="chaos").launch()

    def start(self) -> str:
        self.api = MeshProcess(self.cfg.model, "--layers", f"0:{self.cfg.split}", "--secret", self.cfg.secret,
                               "--mesh-name", "chaos", "--http-port", "0", *self._common()).launch()
        url = self.api.wait_http(120)
        self.replicas = [self._replica() for _ in range(2)]
        for r in self.replicas:
            r.wait_ready(120)
        return url

    def stop(self) -> None:
        for p in [*self.replicas, self.api]:
            if p is not None:
                if p.proc is not None and p.proc.poll() is None:
                    os.kill(p.proc.pid, signal.SIGCONT)
                p.stop()

    def _client(self, url: str, worker: int) -> None:
        rng = random.Random(self.cfg.seed * 1000 + worker)
        while not self._stop.is_set():
            prompt = rng.choice(PROMPTS)
            kind, detail = complete(url, prompt, self.cfg.max_tokens, self.cfg.hang_after)
            with self._lock:
                if kind == "ok":
                    if detail == self.reference[prompt]:
                        self.report.outcomes["completed"] += 1
                    else:
                        self.report.outcomes["wrong"] += 1
                        self.report.wrong.append({"prompt": prompt, "got": detail, "want": self.reference[prompt]})
                elif kind == "error":
                    self.report.outcomes["failed_cleanly"] += 1
                    self.report.errors[" ".join(detail.split())[:120]] += 1
                else:
                    self.report.outcomes[kind] += 1
                    if kind == "unclear":
                        self.report.unclear.append(detail)

    def _event(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.replicas))
        node = self.replicas[i]
        action = rng.choice(["kill9", "kill9", "stop", "graceful_restart"])
        self.report.events[action] += 1
        if action == "kill9":
            node.kill9()
            self._stop.wait(rng.uniform(*self.cfg.down))
            node.stop()
            self.replicas[i] = self._replica().wait_ready(120)
            self.report.events["restart"] += 1
        elif action == "stop":
            assert node.proc is not None
            os.kill(node.proc.pid, signal.SIGSTOP)
            self._stop.wait(rng.uniform(*self.cfg.down))
            os.kill(node.proc.pid, signal.SIGCONT)
            self.report.events["cont"] += 1
        else:
            node.stop()
            self.replicas[i] = self._replica().wait_ready(120)

    def run(self, url: str) -> ChaosReport:
        rng = random.Random(self.cfg.seed)
        clients = [threading.Thread(target=self._client, args=(url, w), daemon=True) for w in range(self.cfg.workers)]
        t0 = time.monotonic()
        for c in clients:
            c.start()
        while time.monotonic() - t0 < self.cfg.duration:
            if self._stop.wait(rng.uniform(*self.cfg.interval)):
                break
            if time.monotonic() - t0 < self.cfg.duration:
                self._event(rng)
        self._stop.set()
        for c in clients:  # a client waits at most hang_after for its last request
            c.join(self.cfg.hang_after + 10)
        self.report.seconds = time.monotonic() - t0
        return self.report


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    """The reference answers from one ``moemesh serve`` process, then the mesh under chaos."""
    from ..server.launcher import ServerProcess

    single = ServerProcess(cfg.model, "--quant", "fp32", "--threads", "1").start(timeout=300)
    try:
        reference = reference_answers(single.base_url, cfg)
    finally:
        single.stop()
    chaos = Chaos(cfg, reference)
    try:
        return chaos.run(chaos.start())
    finally:
        chaos.stop()


def markdown(summary: dict, command: str) -> str:
    o, e = summary["outcomes"], summary["events"]
    lines = ["# Chaos on a 3-node loopback mesh", "", f"`{command}`", "",
             f"{summary['seconds']} s of load; events: " + ", ".join(f"{k} {v}" for k, v in sorted(e.items())), "",
             "| requests | completed | failed cleanly | hung | wrong | unclear |", "|---|---|---|---|---|---|",
             f"| {summary['requests']} | {o['completed']} | {o['failed_cleanly']} | {o['hung']} | {o['wrong']} | {o['unclear']} |",
             "", "Clean failures by message:", ""]
    lines += [f"- {n} x `{m}`" for m, n in summary["errors"].items()] or ["- none"]
    return "\n".join(lines) + "\n"
