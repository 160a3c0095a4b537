"""Prometheus text metrics, named like vLLM's where they mean the same, plus moemesh_expert_*.

Updated only on the asyncio thread (requests) and read there (/metrics), so no lock is needed;
the engine thread's queue sizes are read from its published snapshots.
"""
from __future__ import annotations

import math
import re
from collections import Counter

# vLLM's bucket edges, so dashboards built for vLLM read these unchanged
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        lines, running = [], 0
        for edge, n in zip(self.buckets, self.counts):
            running += n
            lines.append(f'{name}_bucket{{{labels},le="{edge}"}} {running}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()  # finished_reason -> requests
        self.rejected: Counter[int] = Counter()  # HTTP status -> requests turned away
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def render(self, running: int, waiting: int, expert_stats: list[dict],
               engine: tuple[int, int, float] = (0, 0, 0.0), kv_bytes_per_token: int = 0,
               prefix: dict | None = None) -> str:
        """engine: (steps, failed steps, CPU seconds) of the engine thread; prefix: the prefix
        cache's summary (kvcache/prefix_cache.py), None when it is off."""
        labels = f'model_name="{_escape(self.model_name)}"'
        out = [
            "# HELP vllm:num_requests_running Requests in the running batch.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {running}",
            "# HELP vllm:num_requests_waiting Requests admitted but not yet in the batch.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {waiting}",
            "# HELP vllm:prompt_tokens_total Prompt tokens of finished requests.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {self.prompt_tokens}",
            "# HELP vllm:generation_tokens_total Generated tokens.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {self.generation_tokens}",
            "# HELP vllm:request_success_total Finished requests by finish reason.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason in sorted(set(self.finished) | {"stop", "length", "abort"}):
            out.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {self.finished[reason]}')
        for name, hist, help_text in (
            ("vllm:time_to_first_token_seconds", self.ttft, "Time from arrival to the first token."),
            ("vllm:inter_token_latency_seconds", self.itl, "Time between consecutive tokens of a request."),
            ("vllm:e2e_request_latency_seconds", self.e2e, "Time from arrival to the last token."),
        ):
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.render(name, labels)]
        out += ["# HELP moemesh_requests_rejected_total Requests refused before generation, by HTTP status.",
                "# TYPE moemesh_requests_rejected_total counter"]
        for status in sorted(self.rejected):
            out.append(f'moemesh_requests_rejected_total{{{labels},status="{status}"}} {self.rejected[status]}')
        steps, failures, cpu = engine
        out += ["# HELP moemesh_engine_steps_total Engine steps (one forward over the running batch).",
                "# TYPE moemesh_engine_steps_total counter", f"moemesh_engine_steps_total{{{labels}}} {steps}",
                "# HELP moemesh_engine_step_failures_total Steps that raised (their batch was isolated).",
                "# TYPE moemesh_engine_step_failures_total counter",
                f"moemesh_engine_step_failures_total{{{labels}}} {failures}",
                "# HELP moemesh_engine_cpu_seconds_total CPU time of the engine thread (the rest is HTTP).",
                "# TYPE moemesh_engine_cpu_seconds_total counter",
                f"moemesh_engine_cpu_seconds_total{{{labels}}} {cpu}"]
        out += _kv_section(kv_bytes_per_token, prefix, labels)
        out += _expert_section(expert_stats, labels)
        return "\n".join(out) + "\n"


def _kv_section(bytes_per_token: int, prefix: dict | None, labels: str) -> list[str]:
    """KV bytes per token and the prefix cache: token counters named like vLLM V1's."""
    p = prefix or {}
    rows = [
        ("moemesh_kv_bytes_per_token", "gauge", "KV-cache bytes one settled token costs (all layers).", bytes_per_token),
        ("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
         p.get("query_tokens", 0)),
        ("vllm:prefix_cache_hits_total", "counter", "Prompt tokens restored from the prefix cache.", p.get("hit_tokens", 0)),
        ("moemesh_prefix_cache_disk_hits_total", "counter", "Prompt tokens restored from --prompt-cache files.",
         p.get("disk_hit_tokens", 0)),
        ("moemesh_prefix_cache_bytes", "gauge", "Bytes of KV blocks held by the prefix cache.", p.get("bytes", 0)),
        ("moemesh_prefix_cache_capacity_bytes", "gauge", "The prefix cache's budget (0: off).", p.get("capacity_bytes", 0)),
        ("moemesh_prefix_cache_pool_bytes", "gauge", "Bytes of the slabs its blocks live in (held and free slots).",
         p.get("pool_bytes", 0)),
        ("moemesh_prefix_cache_blocks", "gauge", "KV blocks held by the prefix cache.", p.get("blocks", 0)),
        ("moemesh_prefix_cache_evicted_blocks_total", "counter", "Blocks evicted (least recently used first).",
         p.get("evicted_blocks", 0)),
    ]
    out = []
    for name, kind, help_text, value in rows:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {_number(value)}"]
    return out


def _expert_section(stats: list[dict], labels: str) -> list[str]:
    """One gauge per numeric key of each ExpertProvider.stats(); nested dicts become labels."""
    out = ["# HELP moemesh_expert_providers ExpertProviders in the model (resident, lazy or remote).",
           "# TYPE moemesh_expert_providers gauge", f"moemesh_expert_providers{{{labels}}} {len(stats)}"]
    for i, provider_stats in enumerate(stats):
        for key, value, extra in _flatten(provider_stats):
            metric = "moemesh_expert_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
            out.append(f'{metric}{{{labels},provider="{i}"{extra}}} {_number(value)}')
    return out


def _flatten(stats: dict, prefix: str = "") -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    for key, value in stats.items():
        if isinstance(value, bool | int | float):
            rows.append((f"{prefix}{key}", float(value), ""))
        elif isinstance(value, dict):  # e.g. {"hits_by_layer": {0: 12, 1: 9}} -> label key="0"
            for sub, v in value.items():
                if isinstance(v, bool | int | float):
                    rows.append((f"{prefix}{key}", float(v), f',key="{_escape(str(sub))}"'))
    return rows


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
