"""Qwen3-Next (``qwen3next``) GGUFs written as llama.cpp's converter writes them (tests/gguf_write.py
write_qwen3next: in_proj_qkvz regrouped into attn_qkv + attn_gate, norms + 1, -exp(A_log), squeezed
conv, gguf-py's own names) load as the qwen3_next family: logits equal the transformers model's
(fp32 tolerance), greedy tokens equal, lazy experts from the GGUF equal resident ones."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_write import write_qwen3next
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from test_gguf_families import check, forward_all, prompt
from test_hybrid import qwen3_next_configs
from tiny_families import randomize


def qwen3_next(name: str, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = qwen3_next_configs()[name]
    # the converter writes neither mlp_only_layers (gguf-py's qwen3next has no dense FFN tensors) nor
    # norm_topk_prob (the reader takes Qwen3-Next's True)
    cfg.mlp_only_layers, cfg.norm_topk_prob = [], True
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model)
    with torch.no_grad():  # (1 + w) norms: random w around 0
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") and "linear_attn" not in n:
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name,fmt,overrides", [
    ("qwen3_next", Q.F32, {}),  # three DeltaNet layers, then gated attention
    ("qwen3_next-gqa-dense", Q.F16, {}),  # alternating kinds (recurrent_layers), 3 value heads per key head, conv 3
    ("qwen3_next", Q.Q8_0, {"hidden_size": 64, "moe_intermediate_size": 32}),  # experts as Q8_0 blocks under auto
])
def test_qwen3next_gguf_matches_transformers(tmp_path, name, fmt, overrides):
    hf = qwen3_next(name, **overrides)
    write_qwen3next(hf, tmp_path / "m.gguf", fmt)
    ours = load_model(str(tmp_path / "m.gguf"), "fp32")
    assert ours.args.model_type == "qwen3_next" and ours.args.layer_types == hf.config.layer_types
    check(hf, tmp_path / "m.gguf", fmt)


def test_lazy_experts_from_the_gguf_equal_resident(tmp_path):
    """Q8_0 experts read in place from the GGUF under a 4-slot cache: logits bit-identical to resident."""
    write_qwen3next(qwen3_next("qwen3_next", hidden_size=64, moe_intermediate_size=32), tmp_path / "m.gguf", Q.Q8_0)
    ids = prompt(3, 12)
    resident = forward_all(load_model(str(tmp_path / "m.gguf"), "auto").model, ids)
    lazy = load_model(str(tmp_path / "m.gguf"), "auto", experts=ExpertOptions(slots=4))
    assert lazy.provider is not None and not list(tmp_path.glob("*store*"))
    assert torch.equal(forward_all(lazy.model, ids), resident)
    assert lazy.provider.stats()["misses"] > 0
