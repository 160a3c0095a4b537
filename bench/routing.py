"""Routing of the moefied SmolLM2 while it generates, and what it means for the expert cache.

1. Trace (moemesh.moefy.trace): each prompt of moemesh/moefy/data/routing_prompts.txt is answered
   alone (chat template, sampled: temperature 0.7, top-p 0.9, seeded), recording every token's
   experts per layer and the next-layer predictor's guess (experts/lazy.py Lookahead: layer l+1's
   router on layer l's FFN input). Saved as --trace (gzipped JSON) and reused unless --retrace.
2. Statistics per layer: reuse between consecutive tokens, popularity skew, predictor accuracy.
3. Replay, offline, through the cache's own policy classes (LRU, decayed frequency) at several
   cache sizes, with and without next-layer prefetch, next to a uniform synthetic trace of the same
   shape (its "predictor" guesses at random). Prefill steps demand the union of the prompt's
   experts per layer; decode steps one token's. A prefetched expert is read even if unused, so the
   table also gives disk reads per token (misses + prefetch reads).

    .venv/bin/python bench/routing.py --model DIR -> bench/results/routing.{json,md}
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

from moemesh.benchkit.results import write_results
from moemesh.experts.policy import POLICIES, Key, make_policy

ROOT = Path(__file__).resolve().parent.parent


class SimCache:
    """The ExpertCache's bookkeeping without the bytes: slots, policy, pins (protect), prefetch."""

    def __init__(self, policy: str, slots: int) -> None:
        self.policy = make_policy(policy)
        self.slots = slots
        self.cached: set[Key] = set()
        self.prefetched: set[Key] = set()
        self.hits = self.misses = self.prefetch_reads = self.prefetch_hits = 0

    def _room(self, protect: set[Key]) -> bool:
        if len(self.cached) < self.slots:
            return True
        victim = self.policy.victim_where(lambda k: k in self.cached and k not in protect)
        if victim is None:
            return False
        self.cached.discard(victim)
        self.prefetched.discard(victim)
        self.policy.forget(victim)
        return True

    def demand(self, keys: list[Key]) -> None:
        for start in range(0, len(keys), self.slots):  # waves, as LazyExperts does
            wave = keys[start : start + self.slots]
            protect = set(wave)
            for key in wave:
                if key in self.cached:
                    self.hits += 1
                    if key in self.prefetched:
                        self.prefetch_hits += 1
                else:
                    self.misses += 1
                    self._room(protect)
                    self.cached.add(key)
                    self.policy.insert(key)
                self.prefetched.discard(key)
                self.policy.touch(key)

    def prefetch(self, keys: list[Key], protect: set[Key]) -> None:
        for key in keys:
            if key in self.cached:
                continue
            if not self._room(protect | set(keys)):
                break
            self.cached.add(key)
            self.prefetched.add(key)
            self.policy.insert(key)
            self.prefetch_reads += 1


def steps_of(sequences: list[dict]) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Per forward: (per layer the experts demanded, per layer the predicted experts of the next)."""
    out = []
    for s in sequences:
        for step in s["steps"]:
            need = [sorted({e for tok in layer for e in tok}) for layer in step["ids"]]
            pred = [sorted({e for tok in layer for e in tok}) for layer in step["pred"]]
            out.append((need, pred))
    return out


def uniform_like(steps, num_experts: int, k: int, seed: int = 0):
    """Same number of forwards and tokens per forward, experts uniform at random (and a random guess)."""
    rng = random.Random(seed)
    out = []
    for need, _ in steps:
        layers = len(need)
        tokens = max(1, round(len(need[0]) / k)) if len(need[0]) > k else 1
        draw = lambda: sorted({e for _ in range(tokens) for e in rng.sample(range(num_experts), k)})  # noqa: E731
        out.append(([draw() for _ in range(layers)], [rng.sample(range(num_experts), k) for _ in range(layers - 1)] + [[]]))
    return out


def replay(steps, policy: str, slots: int, prefetch: bool, decode_tokens: int) -> dict:
    cache = SimCache(policy, slots)
    for need, pred in steps:
        for layer, experts in enumerate(need):
            keys = [(layer, e) for e in experts]
            cache.demand(keys)
            if prefetch and pred[layer]:
                cache.prefetch([(layer + 1, e) for e in pred[layer]], set(keys))
    lookups = cache.hits + cache.misses
    return {"hit_rate": cache.hits / lookups, "reads_per_token": (cache.misses + cache.prefetch_reads) / decode_tokens,
            "misses_per_token": cache.misses / decode_tokens,
            "prefetch_useful": cache.prefetch_hits / cache.prefetch_reads if cache.prefetch_reads else None}


def load_or_record(a) -> dict:
    path = Path(a.trace)
    if path.is_file() and not a.retrace:
        return json.loads(gzip.decompress(path.read_bytes()))
    import torch

    from moemesh.loading.loader import load_model
    from moemesh.moefy.data import routing_prompts
    from moemesh.moefy.trace import record

    torch.set_num_threads(a.threads)
    loaded = load_model(a.model, "fp32")
    seqs = record(loaded, routing_prompts(), a.max_tokens, seed=a.seed)
    trace = {"meta": {"model": a.model, "config": loaded.config.get("moefy"), "num_experts": loaded.args.num_experts,
                      "top_k": loaded.args.top_k, "max_tokens": a.max_tokens, "seed": a.seed,
                      "prompts": "moemesh/moefy/data/routing_prompts.txt"}, "sequences": seqs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(trace).encode()))
    return trace


def main() -> None:
    from moemesh.moefy.trace import routing_stats

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache/moemesh/smollm2-moe"))
    ap.add_argument("--trace", default=str(ROOT / "bench/results/routing_trace.json.gz"))
    ap.add_argument("--retrace", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/routing"))
    a = ap.parse_args()
    trace = load_or_record(a)
    E, k = trace["meta"]["num_experts"], trace["meta"]["top_k"]
    seqs = trace["sequences"]
    stats = routing_stats(seqs, E)
    steps = steps_of(seqs)
    layers = len(steps[0][0])
    decode_tokens = sum(1 for s in seqs for st in s["steps"] if st["phase"] == "decode") + len(seqs)
    workloads = {"moefied": steps, "uniform": uniform_like(steps, E, k)}
    rows = []
    for frac in (0.25, 0.5, 0.75, 0.9):
        slots = max(k, int(frac * layers * E))
        for name, st in workloads.items():
            for policy in sorted(POLICIES):
                for prefetch in (False, True):
                    r = {"workload": name, "cache_fraction": frac, "slots": slots, "policy": policy,
                         "prefetch": prefetch, **replay(st, policy, slots, prefetch, decode_tokens)}
                    rows.append(r)
                    print(r)
    meta = {**trace["meta"], "layers": layers, "tokens": stats["tokens"], "decode_tokens": decode_tokens,
            "command": "python bench/routing.py"}
    out = Path(a.out)
    write_results(out.parent, out.name, {"meta": meta, "stats": stats, "rows": rows}, markdown(meta, stats, rows), sys.argv)


def markdown(meta: dict, stats: dict, rows: list[dict]) -> str:
    mean = lambda xs: sum(x for x in xs if x is not None) / max(1, sum(x is not None for x in xs))  # noqa: E731
    E, k = meta["num_experts"], meta["top_k"]
    lines = [f"# Routing of the moefied model ({E} experts, top-{k}, {meta['layers']} layers)", "",
             f"Trace: {meta['prompts']}, {meta['tokens']} tokens "
             f"({meta['decode_tokens']} generated), sampled at temperature 0.7. Command: `{meta['command']}`", "",
             "## Per layer", "",
             f"Reuse: share of a token's experts the previous token also used (uniform routing: {stats['uniform_reuse']:.2f}). "
             f"Top-quarter share: picks going to the {max(1, E // 4)} most used experts (uniform: 0.25). "
             "Entropy: of the pick distribution, 1 = uniform. Predictor: share of layer l's experts guessed at layer l-1.", "",
             "| layer | reuse | top-quarter share | entropy | max expert share | predictor |", "|---:|---:|---:|---:|---:|---:|"]
    for li in range(meta["layers"]):
        p = stats["predictor_accuracy"][li]
        lines.append(f"| {li} | {stats['reuse_consecutive'][li]:.2f} | {stats['top_quarter_share'][li]:.2f} | "
                     f"{stats['normalized_entropy'][li]:.3f} | {stats['max_expert_share'][li]:.2f} | "
                     f"{'' if p is None else f'{p:.2f}'} |")
    lines.append(f"| mean | {mean(stats['reuse_consecutive']):.2f} | {mean(stats['top_quarter_share']):.2f} | "
                 f"{mean(stats['normalized_entropy']):.3f} | {mean(stats['max_expert_share']):.2f} | "
                 f"{mean(stats['predictor_accuracy']):.2f} |")
    lines += ["", "## Cache replay", "",
              "Hit rate of demanded experts; reads/token = disk reads per generated token (misses + prefetch reads).", "",
              "| workload | cache | slots | policy | prefetch | hit rate | misses/token | reads/token | prefetch used |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        pu = "" if r["prefetch_useful"] is None else f"{r['prefetch_useful']:.2f}"
        lines.append(f"| {r['workload']} | {100 * r['cache_fraction']:.0f}% | {r['slots']} | {r['policy']} | "
                     f"{'yes' if r['prefetch'] else 'no'} | {r['hit_rate']:.3f} | {r['misses_per_token']:.1f} | "
                     f"{r['reads_per_token']:.1f} | {pu} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
