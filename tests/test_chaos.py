"""Chaos on a 3-node loopback mesh (moemesh.mesh.chaos; the benchmark is bench/chaos.py): replicas
killed with SIGKILL and restarted, frozen with SIGSTOP/SIGCONT and restarted gracefully at seeded
random times while two clients send greedy completions. Every request completes with the
one-process answer or fails with the API's error body: none hangs, none differs, none is unclear."""
from __future__ import annotations

import pytest

from moemesh.benchkit.chat_moe import build_chat_moe_store
from moemesh.mesh.chaos import ChaosConfig, run_chaos


@pytest.mark.slow
def test_chaos_on_a_three_node_mesh(tmp_path):
    build_chat_moe_store(tmp_path, hidden=32, layers=4, experts=8, moe_intermediate=24, seed=7)
    cfg = ChaosConfig(model=str(tmp_path / "hf"), duration=45.0, seed=1, interval=(3.0, 6.0))
    report = run_chaos(cfg)
    s = report.summary()
    print(s)
    assert sum(s["events"].get(k, 0) for k in ("kill9", "stop", "graceful_restart")) >= 3, s
    assert s["outcomes"]["completed"] > 0, s
    assert s["outcomes"]["hung"] == s["outcomes"]["wrong"] == s["outcomes"]["unclear"] == 0, s
