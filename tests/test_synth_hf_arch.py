"""benchkit/synth/hf.py on Mixtral, gpt-oss and DeepSeek-V3 stores: the checkpoint has the published
expert names and layout, holds exactly the store's expert weights (checked against the generator's
own int4 values, so a gate/up swap or a wrong interleave shows), and transformers computes what
moemesh computes with an fp32 trunk. Tiny widths, the real key sets; the clamp of gpt-oss's SwiGLU
is made active (limit 1.0) and DeepSeek's e_score_correction_bias non-zero so both are exercised.

Tolerance: max |logit_hf - logit_moemesh| / max |logit_moemesh| < 1e-3 over 6 teacher-forced
tokens (measured ~3e-5: fp32 summation order; a gate/up swap or a changed routing constant gives
0.4-1.0), and the same top-1 token at every step."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moemesh.benchkit.synth import core as synth
from moemesh.benchkit.synth import hf as synth_hf
from moemesh.benchkit.synth import models as sm
from moemesh.store.expert_store import ExpertStore
from moemesh.weights.safetensors_io import SafetensorsCheckpoint

TINY = {
    "mixtral-8x7b": dict(hidden_size=128, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gpt-oss-120b": dict(hidden_size=128, intermediate_size=64, num_local_experts=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, sliding_window=4, swiglu_limit=1.0),
    "deepseek-v3": dict(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, num_attention_heads=4,
                        q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                        n_group=4, topk_group=2),
}
HF_CLASS = {"mixtral-8x7b": "MixtralForCausalLM", "gpt-oss-120b": "GptOssForCausalLM",
            "deepseek-v3": "DeepseekV3ForCausalLM"}
D, I = 128, 64


def _biased_router(root: Path) -> None:
    """Give DeepSeek's e_score_correction_bias values that change the routing (the generator writes 0)."""
    from safetensors.torch import load_file, save_file

    path = root / "store" / "trunk.safetensors"
    t = load_file(path)
    for name in [n for n in t if n.endswith("e_score_correction_bias")]:
        t[name] = 0.5 * torch.randn(t[name].shape, generator=torch.Generator().manual_seed(3))
    save_file(t, path)


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    key = request.param
    root = tmp_path_factory.mktemp(key)
    cfg = {**sm.MODELS[key].config(2, 256), **TINY[key]}
    (root / "store").mkdir()
    sm.write(root, cfg, 0, None, log=lambda _: None)  # no GGUF: not what this tests
    if key == "deepseek-v3":
        _biased_router(root)
    synth_hf.build_hf(root, log=lambda _: None)
    return key, root


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # check() sets its own
    yield
    torch.set_num_threads(n)


def _deq(q: np.ndarray, d: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((q.astype(np.float32) - 8) * np.repeat(d, synth.GROUP, axis=1))


def _published_expert(ck, key: str, layer: int, e: int) -> dict[str, torch.Tensor]:
    """One expert read back by the published names, written out here independently of synth_hf_arch."""
    base = f"model.layers.{layer}."
    if key == "mixtral-8x7b":
        w = {p: ck.get(f"{base}block_sparse_moe.experts.{e}.{p}.weight") for p in ("w1", "w2", "w3")}
        return {"gate": w["w1"], "up": w["w3"], "down": w["w2"]}
    if key == "deepseek-v3":
        return {p: ck.get(f"{base}mlp.experts.{e}.{p}_proj.weight") for p in ("gate", "up", "down")}
    gu = ck.get(f"{base}mlp.experts.gate_up_proj")  # [E, D, 2I], gate at even columns
    gub = ck.get(f"{base}mlp.experts.gate_up_proj_bias")  # [E, 2I]
    assert gu.shape == (8, D, 2 * I) and gub.shape == (8, 2 * I)
    assert ck.get(f"{base}mlp.experts.down_proj").shape == (8, I, D)
    return {"gate": gu[e][:, 0::2].T, "up": gu[e][:, 1::2].T, "down": ck.get(f"{base}mlp.experts.down_proj")[e].T,
            "gate_up_bias": torch.stack([gub[e][0::2], gub[e][1::2]]).reshape(-1),  # back to [gate; up]
            "down_bias": ck.get(f"{base}mlp.experts.down_proj_bias")[e]}


def test_checkpoint_layout_and_weights(tiny):
    key, root = tiny
    out = synth_hf.hf_dir(root)
    assert (out / "DONE").is_file() and not list(root.glob(".hf.partial-*"))
    store = ExpertStore(root / "store")
    assert json.loads((out / "config.json").read_text()) == store.config
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    ck, trunk = SafetensorsCheckpoint(out), SafetensorsCheckpoint(root / "store")
    n_expert_names = {"mixtral-8x7b": 3 * 8, "gpt-oss-120b": 4, "deepseek-v3": 3 * 16}[key]
    assert set(ck.names()) == set(index) and len(index) == len(trunk.names()) + 2 * n_expert_names
    for n in trunk.names():  # trunk: as stored (dtype too), same names
        assert ck.get(n).dtype == trunk.get(n).dtype and torch.equal(ck.get(n), trunk.get(n)), n
    if key == "deepseek-v3":
        assert ck.get("model.layers.1.mlp.gate.e_score_correction_bias").abs().max() > 0
    for layer, e in ((0, 0), (1, 5)):
        w = sm.expert_weights(0, layer, e, D, I, key == "gpt-oss-120b")  # the generator's int4 values
        got = _published_expert(ck, key, layer, e)
        for p in ("gate", "up", "down"):
            assert got[p].dtype == torch.float32 and torch.equal(got[p], _deq(*w[p])), (layer, e, p)
        if key == "gpt-oss-120b":
            assert torch.equal(got["gate_up_bias"], torch.from_numpy(w["gate_up_bias"]))
            assert torch.equal(got["down_bias"], torch.from_numpy(w["down_bias"]))
    assert synth_hf.build_hf(root, log=lambda _: None) == out  # cached


def test_transformers_matches_moemesh_fp32(tiny):
    pytest.importorskip("transformers")
    key, root = tiny
    res = synth_hf.check(root, n_tokens=6, threads=1)
    assert res["hf_class"] == HF_CLASS[key] and "fp32" in res["moemesh_trunk_modes"]
    assert res["all_experts_equal"], res["experts_equal"]
    want_parts = 6 if key == "gpt-oss-120b" else 3  # + gate/up/down biases
    assert all(len(v) == want_parts for v in res["experts_equal"].values())
    assert res["max_rel_diff"] < 1e-3, res["steps"]
    assert all(s["top1_agree"] for s in res["steps"])
