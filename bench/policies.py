"""Which eviction policy wins on which workload: replay routing traces through the cache's own
policy classes (LRU, decayed frequency) at several cache sizes and report hit rates.

Workloads (L layers x E experts, top-k per token; all seeded):
  uniform   every token picks k experts uniformly: what random-weight benchmark models do
  zipf      per-layer popularity skew (Zipf s=1.0): a few experts are hot
  sticky    consecutive tokens reuse half of the previous token's experts, the rest uniform
  mixed     zipf popularity + sticky reuse

Run: .venv/bin/python bench/policies.py  -> bench/results/policies.{json,md}
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from moemesh.benchkit.results import write_results
from moemesh.experts.policy import POLICIES, Key, make_policy


def trace(kind: str, tokens: int, layers: int, experts: int, k: int, seed: int) -> list[list[Key]]:
    rng = random.Random(seed)
    weights = [[1.0 / (1 + rng.sample(range(experts), experts).index(e)) for e in range(experts)] for _ in range(layers)]
    prev: dict[int, list[int]] = {}
    out = []
    for _ in range(tokens):
        for layer in range(layers):
            chosen: list[int] = []
            if kind in ("sticky", "mixed") and layer in prev:
                chosen = rng.sample(prev[layer], k // 2)
            while len(chosen) < k:
                if kind in ("zipf", "mixed"):
                    e = rng.choices(range(experts), weights=weights[layer])[0]
                else:
                    e = rng.randrange(experts)
                if e not in chosen:
                    chosen.append(e)
            prev[layer] = chosen
            out.append([(layer, e) for e in chosen])
    return out


def replay(steps: list[list[Key]], policy_name: str, slots: int) -> float:
    """Hit rate of a cache of ``slots`` experts; a step's own experts are never evicted."""
    policy = make_policy(policy_name)
    cached: set[Key] = set()
    hits = lookups = 0
    for keys in steps:
        for key in keys:
            lookups += 1
            if key in cached:
                hits += 1
            else:
                if len(cached) >= slots:
                    victim = policy.victim([c for c in cached if c not in keys])
                    cached.discard(victim)
                    policy.forget(victim)
                cached.add(key)
            policy.touch(key)
    return hits / lookups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--out", default="bench/results/policies")
    a = ap.parse_args()
    total = a.layers * a.experts
    fractions = (0.05, 0.1, 0.25, 0.5)
    rows = []
    for kind in ("uniform", "zipf", "sticky", "mixed"):
        steps = trace(kind, a.tokens, a.layers, a.experts, a.top_k, seed=0)
        for frac in fractions:
            slots = max(a.top_k, int(frac * total))
            row = {"workload": kind, "cache_fraction": frac, "slots": slots}
            for name in sorted(POLICIES):
                row[name] = replay(steps, name, slots)
            rows.append(row)
            print(row)
    meta = {"tokens": a.tokens, "layers": a.layers, "experts": a.experts, "top_k": a.top_k,
            "command": "python bench/policies.py"}
    lines = [f"# Expert cache policies: hit rate by workload ({a.layers} layers x {a.experts} experts, top-{a.top_k}, "
             f"{a.tokens} tokens)", "", f"Command: `{meta['command']}`", "",
             "| workload | cache (% of experts) | slots | " + " | ".join(sorted(POLICIES)) + " |",
             "|---|---:|---:|" + "---:|" * len(POLICIES)]
    for r in rows:
        lines.append(f"| {r['workload']} | {100 * r['cache_fraction']:.0f}% | {r['slots']} | "
                     + " | ".join(f"{r[n]:.3f}" for n in sorted(POLICIES)) + " |")
    out = Path(a.out)
    write_results(out.parent, out.name, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n", sys.argv)


if __name__ == "__main__":
    main()
