"""A soak run's outcomes and memory samples, summarised (moemesh.benchkit.soak makes them; bench/soak.py
writes them): outcomes by kind, the unexplained ones with what was seen, latency, RSS and its slope, and
the prefix cache's bytes (a bounded cache: RSS that follows it to its cap is not a leak)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

KINDS = ("chat", "chat_stream", "tools", "completion", "anthropic", "anthropic_stream", "overlong", "bad", "disconnect")
EXPLAINED = frozenset({"ok", "queue_full", "rejected", "left"})
MAX_DETAILS = 100  # unexplained outcomes whose detail the summary keeps


@dataclass
class Outcome:
    kind: str
    category: str  # ok | queue_full | rejected | left | server_error | status_NNN | connection | timeout
    # | truncated | bad_json
    seconds: float
    status: int | None = None
    detail: str = ""  # for an unexplained outcome: what was seen (error body or event, exception, last bytes)


@dataclass
class SoakReport:
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    # the server's bounded cache, from /metrics beside each RSS sample: (seconds, bytes of the prefix
    # cache's slabs); RSS less these is what must stay flat while the cache fills to its capacity
    prefix: list[tuple[float, int]] = field(default_factory=list)
    prefix_capacity: int | None = None
    seconds: float = 0.0

    def rss_less_prefix(self) -> list[tuple[float, int]]:
        """RSS samples less the prefix cache's slabs sampled at the same moment."""
        pool = dict(self.prefix)
        return [(t, b - pool[t]) for t, b in self.rss if t in pool]

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
            "unexplained_details": [{"kind": o.kind, "category": o.category, "status": o.status, "detail": o.detail}
                                    for o in self.unexplained()[:MAX_DETAILS]],
            "latency_ok_s": {"p50": percentile(ok, 50), "p99": percentile(ok, 99), "n": len(ok)},
            "rss_mib": {"start": mib(rss[0]) if rss else None, "end": mib(rss[-1]) if rss else None,
                        "max": mib(max(rss)) if rss else None, "samples": len(rss)},
            "rss_slope": rss_slope(self.rss, warmup),
            "prefix_cache_mib": {"capacity": mib(self.prefix_capacity) if self.prefix_capacity is not None else None,
                                 "end": mib(self.prefix[-1][1]) if self.prefix else None,
                                 "slope_after_warmup": rss_slope(self.prefix, warmup)["mib_per_hour"]},
            "rss_less_prefix_cache_slope": rss_slope(self.rss_less_prefix(), warmup),
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


def markdown(summary: dict[str, Any], title: str) -> str:
    s = summary
    lines = [f"# {title}", "", f"{s['requests']} requests in {s['seconds']} s; unexplained: {s['unexplained']}",
             "", "| kind | outcomes |", "|---|---|"]
    for kind, outcomes in s["by_kind"].items():
        lines.append(f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))} |")
    lat, rss, slope = s["latency_ok_s"], s["rss_mib"], s["rss_slope"]
    lines += ["", f"latency of successful requests: p50 {lat['p50']} s, p99 {lat['p99']} s ({lat['n']} requests)",
              f"RSS: start {rss['start']} MiB, end {rss['end']} MiB, max {rss['max']} MiB ({rss['samples']} samples); "
              f"slope after {slope['after_s']:g} s: {slope['mib_per_hour']} MiB/h ({slope['percent_per_hour']} %/h)"]
    pc, net = s["prefix_cache_mib"], s["rss_less_prefix_cache_slope"]
    if pc["end"] is not None:
        lines += [f"prefix cache (bounded, capacity {pc['capacity']} MiB): {pc['end']} MiB of slabs at the end, "
                  f"growing {pc['slope_after_warmup']} MiB/h; RSS less it: {net['mib_per_hour']} MiB/h "
                  f"({net['percent_per_hour']} %/h)"]
    lines.append("")
    if s["unexplained_details"]:
        lines += ["Unexplained outcomes (first lines of each):", ""]
        lines += [f"- {d['kind']} {d['category']} (HTTP {d['status']}): `{d['detail'][:200]!r}`"
                  for d in s["unexplained_details"]] + [""]
    return "\n".join(lines)
