"""benchkit/synth/hf.py: the HF checkpoint written from a synthetic Qwen3-MoE store holds exactly the
store's expert weights (gate/up split in the order the store packs them) and transformers computes
what moemesh computes with an fp32 trunk. Tiny widths, the real key set."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moemesh.benchkit.synth import core as synth
from moemesh.benchkit.synth import hf as synth_hf
from moemesh.store.expert_store import ExpertStore

TINY = dict(hidden_size=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for k, v in TINY.items():
        mp.setitem(synth.SHAPES, k, v)
    try:
        root = synth.build(tmp_path_factory.mktemp("synth"), 2, 256, 0, log=lambda _: None)
        synth_hf.build_hf(root, log=lambda _: None)
        yield root
    finally:
        mp.undo()


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # check() and the worker set their own
    yield
    torch.set_num_threads(n)


def _deq(q: np.ndarray, d: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((q.astype(np.float32) - 8) * np.repeat(d, synth.GROUP, axis=1))


def test_gate_up_split_matches_the_generated_weights(tiny_root, monkeypatch):
    for k, v in TINY.items():
        monkeypatch.setitem(synth.SHAPES, k, v)
    store = ExpertStore(tiny_root / "store")
    for layer, e in ((0, 0), (1, 5)):
        w = synth.expert_weights(0, layer, e)
        got = synth_hf.expert_tensors(store, layer, e)
        assert got["gate_proj"].dtype == torch.float32 and got["gate_proj"].shape == (64, 128)
        for p, key in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            assert torch.equal(got[p], _deq(*w[key])), (layer, e, p)


def test_checkpoint_layout_and_weights(tiny_root):
    from moemesh.weights.safetensors_io import SafetensorsCheckpoint

    out = synth_hf.hf_dir(tiny_root)
    assert (out / "DONE").is_file() and not list(tiny_root.glob(".hf.partial-*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == ExpertStore(tiny_root / "store").config and cfg["model_type"] == "qwen3_moe"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    ck, store = SafetensorsCheckpoint(out), ExpertStore(tiny_root / "store")
    assert set(ck.names()) == set(index)
    trunk = SafetensorsCheckpoint(tiny_root / "store")
    for n in trunk.names():  # trunk: as stored (bf16), same names
        assert torch.equal(ck.get(n), trunk.get(n)), n
    for e in range(8):
        want = synth_hf.expert_tensors(store, 1, e)
        for p in synth_hf.EXPERT_PARTS:
            assert torch.equal(ck.get(f"model.layers.1.mlp.experts.{e}.{p}.weight"), want[p])
    assert synth_hf.build_hf(tiny_root, log=lambda _: None) == out  # cached


def test_transformers_matches_moemesh_fp32(tiny_root):
    pytest.importorskip("transformers")
    res = synth_hf.check(tiny_root, n_tokens=3, threads=1)
    assert res["all_experts_equal"]
    assert "fp32" in res["moemesh_trunk_modes"]
    assert res["max_rel_diff"] < 1e-3, res["steps"]
    assert all(s["top1_agree"] for s in res["steps"])


def test_lazy_hf_worker_decodes_the_checkpoint(tiny_root):
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # (alone, no other test put it there)
    import lazy_hf

    res = lazy_hf.worker({"model": str(synth_hf.hf_dir(tiny_root)), "tokens": [5, 9, 17, 33, 65], "warmup": 2,
                          "threads": 1, "logits": 2})
    assert res["engine"] == "transformers" and "error" not in res
    assert res["timed_tokens"] == 3 and res["tokens_per_s"] > 0 and len(res["step_s"]) == 5
    assert len(res["logits"]) == 2 and len(res["logits"][0]) == 256
    assert res["peak_rss_bytes"] > 0 and res["disk_read_bytes_per_token"] >= 0
