"""benchkit/synth/models.py: synthetic stores of every benchmarked architecture load in moemesh,
lazy experts compute exactly what resident ones do, and the Mixtral GGUF holds the same weights
(experts bit-identical, q/k rows in llama.cpp's order). Tiny widths, the real key sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.benchkit.synth import core as synth
from moemesh.benchkit.synth import models as sm
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.store.expert_store import ExpertStore

TINY = {
    "mixtral-8x7b": dict(hidden_size=128, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gpt-oss-120b": dict(hidden_size=128, intermediate_size=64, num_local_experts=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, sliding_window=4),
    "deepseek-v3": dict(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, num_attention_heads=4,
                        q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                        n_group=4, topk_group=2),
}


def tiny_model(tmp: Path, key: str) -> tuple[Path, dict]:
    cfg = {**sm.MODELS[key].config(2, 256), **TINY[key]}
    (tmp / "store").mkdir(parents=True)
    sm.write(tmp, cfg, 0, sm.MODELS[key].gguf_arch, log=lambda _: None)
    return tmp, cfg


def decode(store: Path, opts: ExpertOptions | None, n: int = 6) -> torch.Tensor:
    model = load_model(str(store), "int4", experts=opts).model
    cache = model.new_cache()
    cache.add_sequence(0)
    layout = BatchLayout([0], [1])
    return torch.stack([model(torch.tensor([t]), torch.tensor([i]), cache, layout)[0] for i, t in enumerate(range(5, 5 + n))])


@pytest.mark.parametrize("key", sorted(TINY))
def test_store_loads_and_lazy_matches_resident(tmp_path, key):
    root, cfg = tiny_model(tmp_path, key)
    store = ExpertStore(root / "store")
    assert store.config["model_type"] == sm.MODELS[key].model_type
    assert store.moe_layers == [0, 1]  # deepseek: first_k_dense_replace 0
    resident = decode(root / "store", None)  # [T, V]
    lazy = decode(root / "store", ExpertOptions(slots=3, prefetch=True))
    assert torch.isfinite(resident).all() and resident.std() > 0.1
    assert torch.equal(resident, lazy)
    assert (root / "model.gguf").is_file()  # every benchmarked architecture has a GGUF


def test_gpt_oss_blobs_hold_biases(tmp_path):
    root, cfg = tiny_model(tmp_path, "gpt-oss-120b")
    store = ExpertStore(root / "store")
    assert store.manifest["expert_module"]["kind"] == "clamped_swiglu"
    expert = store.read_expert(1, 3, True)
    w = sm.expert_weights(0, 1, 3, 128, 64, True)
    assert torch.equal(expert.gate_up.bias, torch.from_numpy(w["gate_up_bias"]))
    assert torch.equal(expert.down.bias, torch.from_numpy(w["down_bias"]))
    # the int4 weights are exactly (q - 8) * d
    want = (w["down"][0].astype(np.float32) - 8) * np.repeat(w["down"][1], 32, axis=1)
    assert torch.equal(expert.down.dequantized_weight().float(), torch.from_numpy(want))


def test_mixtral_gguf_same_weights(tmp_path):
    from moemesh.loading.gguf_checkpoint import open_gguf

    root, cfg = tiny_model(tmp_path, "mixtral-8x7b")
    g = open_gguf(root / "model.gguf")
    assert g.config["model_type"] == "mixtral" and g.config["num_local_experts"] == 8
    w = sm.expert_weights(0, 1, 5, 128, 64, False)
    gate = g.tensors["model.layers.1.block_sparse_moe.experts.5.w1.weight"].dequantize()
    assert torch.equal(gate, torch.from_numpy((w["gate"][0].astype(np.float32) - 8) * np.repeat(w["gate"][1], 32, axis=1)))
    # q/k: the reader undoes llama.cpp's row order, so a wrong permutation would show here
    from safetensors.torch import load_file

    trunk = load_file(root / "store" / "trunk.safetensors")
    for p in ("q", "k"):
        name = f"model.layers.0.self_attn.{p}_proj.weight"
        got, ref = g.tensors[name].dequantize(), trunk[name].float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
        assert cos > 0.98, (p, cos)


def test_gpt_oss_gguf_same_experts_and_add_gguf(tmp_path):
    """The gpt-oss GGUF's expert weights and biases are the store's; add_gguf (a GGUF for a store
    written before) writes the same file as the first build."""
    import gguf

    root, cfg = tiny_model(tmp_path, "gpt-oss-120b")
    r = gguf.GGUFReader(root / "model.gguf")
    t = {x.name: x for x in r.tensors}
    w = sm.expert_weights(0, 1, 2, 128, 64, True)
    assert np.array_equal(np.asarray(t["blk.1.ffn_up_exps.weight"].data)[2], synth.q4_0_bytes(*w["up"]))
    assert np.array_equal(np.asarray(t["blk.1.ffn_up_exps.bias"].data)[2], w["gate_up_bias"][64:])
    assert {"blk.0.attn_sinks.weight", "blk.0.post_attention_norm.weight", "blk.0.ffn_gate_inp.bias"} <= set(t)
    first = (root / "model.gguf").read_bytes()
    (root / "model.gguf").unlink()
    sm.add_gguf(root, cfg, 0, "gpt-oss", log=lambda _: None)
    assert (root / "model.gguf").read_bytes() == first


def test_qwen3_dispatch_keeps_cached_layout(tmp_path):
    assert sm.model_dir(tmp_path, "qwen3-30b-a3b", 12, 32768, 0) == synth.model_dir(tmp_path, 12, 32768, 0)
    assert sm.model_dir(tmp_path, "qwen3-30b-a3b", 12, 32768, 0).name == f"qwen3moe-synth-v{synth.SYNTH_VERSION}-L12-V32768-s0"
