"""benchkit/cache_sim.py (the hit rate plan_check predicts from a routing trace) against the real
expert cache driven by the same lookups: the replay must count exactly the hits the cache counts."""
from __future__ import annotations

import random

import pytest

from moemesh.benchkit.cache_sim import replay_hit_rate
from moemesh.experts.cache import ExpertCache
from moemesh.experts.io import BlobReader
from moemesh.experts.policy import POLICIES
from moemesh.loading.convert import convert
from moemesh.store.expert_store import ExpertStore


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    path = convert(tiny_checkpoints["qwen3_moe-norm"][1], tmp_path_factory.mktemp("sim") / "store", "int4",
                   progress=False)
    return ExpertStore(path)


def skewed_trace(layers: int, experts: int, top_k: int, tokens: int, seed: int) -> list[list[int]]:
    """One router call per layer and token; experts drawn with a Zipf-like skew, as real routers pick."""
    rng = random.Random(seed)
    weights = [1 / (1 + e) for e in range(experts)]
    trace = []
    for _ in range(tokens):
        for layer in range(layers):
            picks: list[int] = []
            while len(picks) < top_k:
                e = rng.choices(range(experts), weights)[0]
                if e not in picks:
                    picks.append(e)
            trace.append([layer, *picks])
    return trace


def real_cache_hits(store: ExpertStore, trace: list[list[int]], slots: int, policy: str, skip: int) -> float:
    reader = BlobReader(store.experts_path, 1, direct=False)
    cache = ExpertCache(store, slots, POLICIES[policy](), reader)
    layer_ids = store.moe_layers
    try:
        for i, (layer, *experts) in enumerate(trace):
            if i == skip:
                hits0, misses0 = cache.stats.hits, cache.stats.misses
            entries = cache.acquire([(layer_ids[layer], e) for e in experts])
            for entry in entries:
                cache.expert(entry)
            cache.release(entries)
        hits, misses = cache.stats.hits - hits0, cache.stats.misses - misses0
    finally:
        reader.close()
    return hits / (hits + misses)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_replay_counts_the_real_caches_hits(store, policy):
    layers, experts, top_k = len(store.moe_layers), store.num_experts, store.config["num_experts_per_tok"]
    trace = skewed_trace(layers, experts, top_k, tokens=30, seed=3)
    seen = []
    for slots in (top_k, layers * top_k, layers * experts // 2, layers * experts):
        want = real_cache_hits(store, trace, slots, policy, skip=5 * layers)
        got = replay_hit_rate(trace, slots, policy, skip_calls=5 * layers)
        assert got == pytest.approx(want, abs=1e-12), slots
        seen.append(got)
    # every expert fits: the only misses are the experts first picked after the warm-up
    before = {(c[0], e) for c in trace[: 5 * layers] for e in c[1:]}
    late = {(c[0], e) for c in trace[5 * layers :] for e in c[1:]} - before
    assert seen[-1] == pytest.approx(1 - len(late) / (top_k * (len(trace) - 5 * layers)))
    assert seen[0] < seen[1] < seen[-1]  # the test discriminates: more slots, more hits


def test_replay_refuses_a_cache_smaller_than_one_layers_picks():
    with pytest.raises(ValueError, match="slots"):
        replay_hit_rate([[0, 1, 2, 3]], 2)


def test_replay_skips_warmup_calls():
    trace = [[0, 1], [0, 1], [0, 1]]
    assert replay_hit_rate(trace, 1) == pytest.approx(2 / 3)  # the first lookup is a cold miss
    assert replay_hit_rate(trace, 1, skip_calls=1) == 1.0
