"""benchkit/synth/gguf_deepseek.py: the DeepSeek-V3 synthetic GGUF (llama.cpp's ``deepseek2``) holds
the store's weights in the converter's layout and the keys llama.cpp reads. The llama.cpp run
itself (bench/gguf_parity.py) is slow and needs llama-cpp-python's venv: skipped without it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gguf_parity  # noqa: E402
from moemesh.benchkit.synth import core as synth
from moemesh.benchkit.synth import models as sm

LLAMA_PY = Path(gguf_parity.LLAMA_PY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ds")
    return root, gguf_parity.tiny_model(root, "deepseek-v3")


def fields(r) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.token")}


def test_gguf_layout_and_keys(tiny):
    import gguf
    from safetensors.torch import load_file

    root, cfg = tiny
    r = gguf.GGUFReader(root / "model.gguf")
    kv, t = fields(r), {x.name: x for x in r.tensors}
    a = "deepseek2."
    assert kv["general.architecture"] == "deepseek2"
    want = {"attention.head_count_kv": 1, "attention.key_length": 32 + 32, "attention.value_length": 32,
            "attention.key_length_mla": 32 + 32, "attention.value_length_mla": 32, "attention.q_lora_rank": 64,
            "attention.kv_lora_rank": 32, "rope.dimension_count": 32, "leading_dense_block_count": 0,
            "expert_count": 16, "expert_used_count": 4, "expert_shared_count": 1, "expert_group_count": 4,
            "expert_group_used_count": 2, "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
            "expert_weights_norm": True, "expert_feed_forward_length": 64, "rope.scaling.type": "yarn",
            "rope.scaling.original_context_length": 4096}
    assert {k: kv[a + k] for k in want} == want
    assert kv[a + "expert_weights_scale"] == pytest.approx(2.5)
    assert kv[a + "rope.scaling.factor"] == pytest.approx(40.0)
    assert kv[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)  # 0.1 * mscale_all_dim
    q4, f32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    for i in range(2):
        p = f"blk.{i}."
        assert t[p + "attn_k_b.weight"].shape.tolist() == [32, 32, 4]  # ggml order of torch [H, L, N]
        assert t[p + "attn_v_b.weight"].shape.tolist() == [32, 32, 4]  # [H, V, L]
        assert t[p + "ffn_gate_exps.weight"].shape.tolist() == [128, 64, 16]
        assert t[p + "exp_probs_b.bias"].tensor_type == f32 and t[p + "ffn_gate_inp.weight"].tensor_type == f32
        for n in ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_output", "ffn_up_shexp", "ffn_down_exps"):
            assert t[p + n + ".weight"].tensor_type == q4, n
    # kv_b split as the converter does: k_b = key rows transposed, v_b = value rows, per head
    trunk = load_file(root / "store" / "trunk.safetensors")
    kv_b = trunk["model.layers.1.self_attn.kv_b_proj.weight"].float().numpy().reshape(4, 64, 32)
    k_b = np.asarray(t["blk.1.attn_k_b.weight"].data).reshape(4, 32, 32)
    v_b = np.asarray(t["blk.1.attn_v_b.weight"].data).reshape(4, 32, 32)
    assert np.array_equal(k_b, kv_b[:, :32].transpose(0, 2, 1)) and np.array_equal(v_b, kv_b[:, 32:])
    bias = trunk["model.layers.0.mlp.gate.e_score_correction_bias"].float().numpy()
    assert np.array_equal(np.asarray(t["blk.0.exp_probs_b.bias"].data), bias) and bias.std() > 0.05
    # experts: the store's weights, bit for bit
    w = sm.expert_weights(0, 1, 9, 128, 64, False)
    assert np.array_equal(np.asarray(t["blk.1.ffn_down_exps.weight"].data)[9], synth.q4_0_bytes(*w["down"]))


def test_float_trunk_gguf(tiny):
    import gguf

    root, _ = tiny
    t = {x.name: x for x in gguf.GGUFReader(root / "model-f32.gguf").tensors}
    assert t["blk.0.attn_q_b.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.0.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_PY.is_file(), reason="llama-cpp-python venv not installed")
def test_llama_cpp_matches_moemesh():
    """F32 trunk on both sides: only llama.cpp's Q8_0 activations and F16 KV cache differ."""
    r = gguf_parity.run("deepseek-v3", steps=24)
    f = r["f32"]
    assert f["cosine_min"] > 0.999 and f["max_rel_diff"] < 0.05 and f["top1_agree"] >= 0.9, f
