"""FP8 safetensors checkpoints (DeepSeek-V3/R1's format: e4m3 ``weight`` with fp32 ``weight_scale_inv`` per
128x128 block) load as they are under ``--quant auto``: every such linear a BlockLinear on quant/fp8.py's
rows, computed by the block kernels, giving the logits of the same dequantized weights in fp32; an explicit
``--quant int4`` converts from the dequantized values; a scale that does not fit its weight is a clear error."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import CheckpointError
from moemesh.loading.loader import load_model
from moemesh.quant import fp8
from moemesh.quant.blocks import BlockLinear
from moemesh.quant.qlinear import QuantLinear

FP8_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\..*proj\.weight$")  # not the router, norms, embeddings
PROMPT = [5, 17, 3, 99, 42, 7]


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w fp32 [N, K] -> (e4m3 [N, K], fp32 scale_inv [ceil(N/128), ceil(K/128)]): amax / 448 per block."""
    n, k = w.shape
    nb, kb = -(-n // 128), -(-k // 128)
    padded = torch.zeros(nb * 128, kb * 128)
    padded[:n, :k] = w
    blocks = padded.view(nb, 128, kb, 128)
    s = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)  # [nb, kb]
    q = (blocks / s[:, None, :, None]).view(nb * 128, kb * 128)[:n, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), s.float()


def write_checkpoints(root: Path, layers: int = 2, shards: int = 1) -> tuple[Path, Path]:
    """(an FP8 DeepSeek-V3 checkpoint, the same model with those weights dequantized to fp32) under root;
    ``layers`` decoder layers (the first dense, the rest MoE); ``shards`` > 1 deals the FP8 one's tensors
    round-robin by name into that many files with a model.safetensors.index.json (so a weight and its
    weight_scale_inv land in different files)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(vocab_size=160, num_hidden_layers=layers, max_position_embeddings=256, hidden_size=64,
                           intermediate_size=96, moe_intermediate_size=32, qk_nope_head_dim=16, v_head_dim=16,
                           num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8,
                           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                           n_group=2, topk_group=1, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    ref, q8 = root / "ref", root / "fp8"
    model.save_pretrained(ref)
    shutil.copytree(ref, q8)
    (q8 / "model.safetensors").unlink()
    tensors, dequantized = load_file(ref / "model.safetensors"), {}
    fp8_tensors = {}
    for name, t in tensors.items():
        if FP8_LINEAR.match(name):
            q, s = quantize_fp8(t.float())
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = q, s
            dequantized[name] = fp8.dequantize(fp8.pack(q, s), t.shape[1])  # the values the FP8 file holds
        else:
            fp8_tensors[name] = dequantized[name] = t
    assert sum(n.endswith("_scale_inv") for n in fp8_tensors) >= 10
    if shards == 1:
        save_file(fp8_tensors, q8 / "model.safetensors", metadata={"format": "pt"})
    else:
        files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        weight_map = {n: files[i % shards] for i, n in enumerate(sorted(fp8_tensors))}
        for f in files:
            save_file({n: t for n, t in fp8_tensors.items() if weight_map[n] == f}, q8 / f, metadata={"format": "pt"})
        (q8 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(dequantized, ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((q8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (q8 / "config.json").write_text(json.dumps(config))
    return q8, ref


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    return write_checkpoints(tmp_path_factory.mktemp("fp8"))


def greedy(model, n: int = 8) -> tuple[list[int], list[torch.Tensor]]:
    engine = Engine(model)
    seen: list[torch.Tensor] = []
    real = engine._sample
    engine._sample = lambda seqs, ready, logits: (seen.append(logits.clone()), real(seqs, ready, logits))[1]
    (seq,) = engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=n))
    return seq.output_ids, seen  # logits of the prefill, then of each decode step


def test_fp8_linears_stay_fp8_and_match_their_dequantized_weights(checkpoints):
    q8, ref = checkpoints
    model = load_model(str(q8), "auto").model
    blocks = [m for m in model.modules() if isinstance(m, BlockLinear)]
    assert len(blocks) >= 10 and all(b.qtype == fp8.QTYPE for b in blocks)  # attention, MLPs and experts
    ids, logits = greedy(model)
    ref_ids, ref_logits = greedy(load_model(str(ref), "fp32").model)
    assert ids == ref_ids
    # the prefill's rows, then one-token decode steps; the FP8 kernels convert e4m3 to fp32 exactly and
    # accumulate in fp32 (blocks_fp8.h): ~1e-7 apart, only the summation order differs
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 1e-5, f"step {step}: FP8 kernels vs the dequantized weights in fp32, relative error {err:.2e}"


def test_int4_is_an_explicit_conversion_from_the_dequantized_weights(checkpoints):
    q8, _ = checkpoints
    model = load_model(str(q8), "int4").model
    assert not any(isinstance(m, BlockLinear) for m in model.modules())
    assert any(isinstance(m, QuantLinear) and m.mode == "int4" for m in model.modules())
    ids, _ = greedy(model, 4)
    assert len(ids) == 4


def test_a_scale_that_does_not_fit_its_weight_names_the_tensor(checkpoints, tmp_path):
    q8, _ = checkpoints
    bad = tmp_path / "bad"
    shutil.copytree(q8, bad)
    tensors = load_file(bad / "model.safetensors")
    name = next(n for n in tensors if n.endswith("o_proj.weight_scale_inv"))
    tensors[name] = torch.ones(3, 3)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(name.removesuffix("_scale_inv"))):
        load_model(str(bad), "auto")


def test_lazy_experts_from_the_fp8_checkpoint(checkpoints, tmp_path, monkeypatch):
    """--ram on an FP8 checkpoint: its experts streamed (from the file, or from a store `moemesh convert`
    writes) give the resident model's tokens."""
    from moemesh.loading.convert import convert
    from moemesh.loading.experts import ExpertOptions

    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))  # the store --ram converts to, not ~/.cache
    q8, _ = checkpoints
    want, _ = greedy(load_model(str(q8), "auto").model)
    lazy, _ = greedy(load_model(str(q8), "auto", experts=ExpertOptions(slots=4)).model)
    assert lazy == want
    store = convert(q8, tmp_path / "store", "auto", progress=False)
    stored, _ = greedy(load_model(str(store), experts=ExpertOptions(slots=4)).model)
    assert stored == want
