"""GLM-4.5+ (``glm4moe``) GGUFs written as llama.cpp's converter writes them (tests/gguf_write.py
write_glm4moe: gguf-py's own tensor names) load as the glm4_moe family: logits equal the transformers
model's (fp32 tolerance; experts decoded from their GGUF bytes on both sides), greedy tokens equal."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_write import write_glm4moe
from moemesh.loading.loader import load_model
from test_gguf_families import check
from tiny_families import randomize, text_configs


def glm(name: str, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = text_configs()[name]
    cfg.n_group = cfg.topk_group = 1  # llama.cpp's glm4moe has no expert groups (nor do GLM's releases)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model)
    return model


@pytest.mark.parametrize("name,fmt,overrides", [
    ("glm4_moe", Q.F32, {}),  # q/k norms, attention bias, a dense first layer, a shared expert
    ("glm4_moe-nonorm", Q.F16, {}),  # no q/k norm, partial rotary 0.25, no top-k renorm, 2 shared experts
    ("glm4_moe", Q.Q8_0, {"hidden_size": 64, "moe_intermediate_size": 32}),  # experts kept as Q8_0 blocks under auto
])
def test_glm4moe_gguf_matches_transformers(tmp_path, name, fmt, overrides):
    hf = glm(name, **overrides)
    write_glm4moe(hf, tmp_path / "m.gguf", fmt)
    ours = load_model(str(tmp_path / "m.gguf"), "fp32")
    a = ours.args
    assert a.model_type == "glm4_moe" and a.routing.scoring == "sigmoid"
    assert a.moe_layers == [i for i in range(hf.config.num_hidden_layers) if i >= hf.config.first_k_dense_replace]
    assert ours.tokenizer is not None
    check(hf, tmp_path / "m.gguf", fmt)
