"""gpt-oss and DeepSeek GGUFs (llama.cpp's ``gpt-oss`` and ``deepseek2``) vs transformers.

Tiny random transformers models are written as GGUF the way llama.cpp's converter writes them
(tests/gguf_write.py), with the routed experts in each format gguf-py can produce or that we pack
(F32, F16, Q8_0, MXFP4, and random valid Q4_K / Q6_K blocks); the transformers model is given the
decoded GGUF expert values (``gguf.quants.dequantize``), so both hold the same function.

Tolerances: logits within 1e-4 when the experts are computed in fp32 from their dequantized values
(the format is decoded exactly; only summation order differs); experts computed from their blocks
by a kernel that quantizes activations (quant/blocks.py) differ by that kernel's own stated error,
so those checks use TOL_BLOCKS below and the greedy tokens must still match.
"""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gguf_write import write_deepseek, write_gpt_oss
from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model

V = 160
TOL_FP32 = 1e-4
TOL_BLOCKS = 2e-2  # the block kernels' activation quantization (see tests/test_block_kernels.py)


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n,), generator=g).tolist()


def forward_all(model, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)


def greedy(model, ids: list[int], n: int = 24) -> list[int]:
    engine = Engine(model)
    return engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=n))[0].output_ids


def hf_greedy(hf, ids: list[int], n: int = 24) -> list[int]:
    with torch.no_grad():
        return hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def gpt_oss_model(hidden: int, inter: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GptOssConfig

    yarn = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                original_max_position_embeddings=4096, rope_theta=150000.0)
    cfg = GptOssConfig(vocab_size=V, max_position_embeddings=131072, num_hidden_layers=3, hidden_size=hidden,
                       intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       sliding_window=4, num_local_experts=4, num_experts_per_tok=2, rope_parameters=yarn,
                       eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 1.0)
            elif "router" in name:
                p.normal_(0, 0.5)
            elif name.endswith("gate_up_proj"):
                p.normal_(0, 0.6)  # the clamp engages
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif name.endswith("down_proj"):
                p.normal_(0, 0.1)
    model.generation_config.eos_token_id = None
    return model


def deepseek_model(v3: bool, hidden: int, inter: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

    common = dict(vocab_size=V, num_hidden_layers=3, max_position_embeddings=256, hidden_size=hidden, intermediate_size=64,
                  moe_intermediate_size=inter, qk_nope_head_dim=8, v_head_dim=8, rms_norm_eps=1e-5, num_attention_heads=4,
                  q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=4, n_routed_experts=8, num_experts_per_tok=2,
                  first_k_dense_replace=1, eos_token_id=None, pad_token_id=None)
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                rope_theta=10000.0, mscale=0.8, mscale_all_dim=0.8)
    if v3:
        cfg = DeepseekV3Config(**common, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                               rope_parameters=yarn)
    else:
        cfg = DeepseekV2Config(**common, n_shared_experts=2, routed_scaling_factor=1.5)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.generation_config.eos_token_id = None
    return model


# (expert type, hidden, expert width): K-quants need widths that are multiples of 256
SLOW = pytest.mark.slow  # the default run keeps one float, MXFP4 and one K-quant per family
FORMATS = [pytest.param(Q.F32, 64, 32, id="F32"), pytest.param(Q.F16, 64, 32, id="F16", marks=SLOW),
           pytest.param(Q.Q8_0, 64, 32, id="Q8_0", marks=SLOW), pytest.param(Q.MXFP4, 64, 64, id="MXFP4"),
           pytest.param(Q.Q4_K, 256, 256, id="Q4_K"), pytest.param(Q.Q6_K, 256, 256, id="Q6_K", marks=SLOW)]


_MODELS: dict = {}


def fresh(kind: str, *args):
    """A copy of a tiny model built once per configuration (the writer edits its experts)."""
    import copy

    if (kind, args) not in _MODELS:
        _MODELS[kind, args] = gpt_oss_model(*args) if kind == "gpt_oss" else deepseek_model(*args)
    return copy.deepcopy(_MODELS[kind, args])


def check(hf, path, fmt: Q) -> None:
    """fp32 (experts decoded) and auto (experts at their stored precision) against transformers."""
    ids, start = prompt(1, 20), prompt(2, 7)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [T, V]
    want = hf_greedy(hf, start)
    for quant, tol in (("fp32", TOL_FP32), ("auto", TOL_BLOCKS)):
        ours = load_model(str(path), quant)
        layer = ours.args.moe_layers[0]
        expert = ours.model.layers[layer].ffn.provider.experts[layer][0]
        kind = type(expert.down).__name__
        if quant == "auto" and fmt not in (Q.F32, Q.F16):
            assert kind == "BlockLinear" and expert.down.qtype == fmt.name and expert.gate_up.qtype == fmt.name
        else:
            assert kind == "QuantLinear" and expert.down.mode == "fp32"
        got = forward_all(ours.model, ids)
        assert got.shape == ref.shape
        err = (got - ref).abs().max().item()
        print(f"{fmt.name} {quant}: max |logit diff| {err:.2e}")
        assert err < tol, (quant, err)
        assert greedy(ours.model, start) == want, quant


@pytest.mark.parametrize("fmt,hidden,inter", FORMATS)
def test_gpt_oss_gguf_matches_transformers(tmp_path, fmt, hidden, inter):
    hf = fresh("gpt_oss", hidden, inter)
    write_gpt_oss(hf, tmp_path / "m.gguf", fmt)
    ours = load_model(str(tmp_path / "m.gguf"), "fp32")
    assert ours.args.model_type == "gpt_oss" and ours.args.layer_types == ["sliding_attention", "full_attention",
                                                                          "sliding_attention"]
    assert ours.tokenizer is not None
    check(hf, tmp_path / "m.gguf", fmt)


@pytest.mark.parametrize("v3", [False, True], ids=["v2", "v3"])
@pytest.mark.parametrize("fmt,hidden,inter", FORMATS)
def test_deepseek_gguf_matches_transformers(tmp_path, v3, fmt, hidden, inter):
    hf = fresh("deepseek", v3, hidden, inter)
    write_deepseek(hf, tmp_path / "m.gguf", fmt)
    ours = load_model(str(tmp_path / "m.gguf"), "fp32")
    assert ours.args.model_type == ("deepseek_v3" if v3 else "deepseek_v2")
    assert ours.args.moe_layers == [1, 2]  # leading dense layer
    check(hf, tmp_path / "m.gguf", fmt)
