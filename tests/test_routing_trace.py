"""The calibrated routing traces reproduce the published measurements they are fitted to
(benchkit/routing_trace.py), and the uniform trace is what random weights do."""
from __future__ import annotations

import numpy as np

from moemesh.benchkit.cache_sim import replay_hit_rate
from moemesh.benchkit.routing_trace import PROFILES, cache_calls, repeat_fraction, uniform

TOKENS = 700  # steady state after the first half (the replay's warm-up)


def steady_hit_rate(trace: np.ndarray, slots: int, policy: str) -> float:
    calls = cache_calls(trace)
    return replay_hit_rate(calls, slots, policy, skip_calls=len(calls) // 2)


def test_traces_are_valid_and_seeded():
    p = PROFILES["gpt-oss-120b"]
    tr = p.generate(50, seed=3)
    assert tr.shape == (50, 36, 4) and tr.min() >= 0 and tr.max() < 128
    assert all(len(set(row)) == 4 for row in tr.reshape(-1, 4).tolist())  # k distinct experts per layer
    assert np.array_equal(tr, p.generate(50, seed=3)) and not np.array_equal(tr, p.generate(50, seed=4))


def test_qwen3_profile_matches_published_reuse_and_lru_curve():
    p = PROFILES["qwen3-30b-a3b"]
    tr = p.generate(TOKENS, seed=1)
    assert 0.42 <= repeat_fraction(tr) <= 0.49  # ~45% of picks repeat at the next token
    slots = int(0.4 * p.num_layers * p.num_experts)
    assert 0.90 <= steady_hit_rate(tr, slots, "lru") <= 0.95  # LRU holding 40% of experts
    first, last = (np.bincount(tr[:, layer].reshape(-1), minlength=128) for layer in (0, -1))
    assert first.max() < 3 * first.mean() and last.max() > 8 * last.mean()  # skew rises with depth


def test_gpt_oss_profile_matches_published_reuse_and_2gb_hit_rate():
    p = PROFILES["gpt-oss-120b"]
    tr = p.generate(TOKENS, seed=1)
    assert 0.16 <= repeat_fraction(tr) <= 0.21  # ~18% previous-token prediction
    slots = (2 * 10**9) // 12_976_128  # MXFP4 expert: (2 * 2880 + 2880) rows x 2880 / 32 blocks x 17 bytes
    assert 0.07 <= steady_hit_rate(tr, slots, "lfu") <= 0.10  # a 2 GB cache hits 8-9%


def test_uniform_trace_is_the_worst_case():
    tr = uniform(TOKENS, 48, 128, 8, seed=1)
    assert abs(repeat_fraction(tr) - 8 / 128) < 0.01  # chance only
    slots = int(0.4 * 48 * 128)
    assert 0.34 <= steady_hit_rate(tr, slots, "lru") <= 0.41  # about the fraction cached (0.4), nothing more


def test_replay_feeds_the_trace_to_the_routers_and_predictors(tiny_checkpoints, tmp_path):
    """Installed on a lazy model, the MoE layers pick the trace's experts, prefill and decode walking
    it in order; the prefetch predictors see the next picks (accuracy 1: every prediction right)."""
    from moemesh.benchkit.routing_trace import RoutingProfile
    from moemesh.benchkit.trace_router import TraceReplay
    from moemesh.engine.engine import Engine
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.loading.convert import convert
    from moemesh.loading.experts import ExpertOptions
    from moemesh.loading.loader import load_model

    store = convert(tiny_checkpoints["qwen3_moe-norm"][1], tmp_path / "st", "int4", progress=False)
    loaded = load_model(str(store), experts=ExpertOptions(slots=6))
    args = loaded.args
    trace = RoutingProfile("t", len(args.moe_layers), args.num_experts, args.top_k, 0.3, 0.2, 2.0).generate(40, seed=5)
    TraceReplay(trace, predict_accuracy=1.0).install(loaded.model)
    seen: list[list[list[int]]] = []
    run = loaded.provider.run

    def spy(layer, x, ids, weights, rows=None):
        seen.append(ids.tolist())
        return run(layer, x, ids, weights, rows)

    loaded.provider.run = spy  # type: ignore[method-assign]
    Engine(loaded.model).generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=5))
    moe = len(args.moe_layers)
    tokens = [4] + [1] * 4  # the prompt's 4 rows, then one row per decode step
    want, t = [], 0
    for n in tokens:
        for j in range(moe):
            want.append(trace[t : t + n, j].tolist())
        t += n
    assert seen == want
    assert loaded.provider.stats()["prefetch_accuracy"] == 1.0
