"""gpt_oss vs transformers on tiny random checkpoints (fp32): sinks, sliding/full layers, YaRN,
biased router, clamped SwiGLU experts with biases."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kvcache.turboquant import TurboQuantKVCache
from moemesh.loading.loader import load_model

V = 160
YARN = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=4096, rope_theta=150000.0)  # gpt-oss-20b's own


def configs() -> dict:
    from transformers import GptOssConfig

    common = dict(vocab_size=V, max_position_embeddings=131072, eos_token_id=None, pad_token_id=None)
    return {
        # the published layout: sliding/full alternating, GQA, YaRN as in gpt-oss-20b
        "gqa-alt": GptOssConfig(**common, num_hidden_layers=3, hidden_size=32, intermediate_size=24,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                num_local_experts=4, num_experts_per_tok=2, rope_parameters=dict(YARN)),
        # custom layer types, 3 query heads per KV head, truncated YaRN with another factor
        "gqa3-custom": GptOssConfig(**common, num_hidden_layers=4, hidden_size=48, intermediate_size=16,
                                    num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=6,
                                    layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                 "full_attention"],
                                    num_local_experts=6, num_experts_per_tok=3,
                                    rope_parameters=dict(YARN, factor=8.0, truncate=True, beta_fast=16.0,
                                                        original_max_position_embeddings=16384)),
        # MHA, untruncated YaRN, a smaller SwiGLU clamp
        "mha": GptOssConfig(**common, num_hidden_layers=2, hidden_size=32, intermediate_size=20,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            num_local_experts=5, num_experts_per_tok=2, swiglu_limit=3.0,
                            rope_parameters=dict(YARN)),
    }


NAMES = list(configs())


def make_checkpoint(config, directory, seed: int = 0):
    """Random weights with sinks, biases and routing large enough to matter; saved fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 1.0)
            elif "router" in name:
                p.normal_(0, 0.5)
            elif name.endswith("gate_up_proj"):
                p.normal_(0, 0.6)  # pre-activations of several units: the clamp engages
            elif name.endswith("_bias") or name.endswith(".bias"):
                p.normal_(0, 0.2)
            elif name.endswith("down_proj"):
                p.normal_(0, 0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {name: (lambda d: (make_checkpoint(cfg, d), d))(tmp_path_factory.mktemp(f"gpt_oss-{name}"))
            for name, cfg in configs().items()}


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n,), generator=g).tolist()


def forward_all(model, ids: list[int], cache=None) -> torch.Tensor:
    cache = cache if cache is not None else model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_match_transformers(ckpts, name):
    hf, d = ckpts[name]
    ids = prompt(1, 20)  # longer than every sliding window
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [T, V]
    got = forward_all(load_model(str(d), "fp32").model, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


def test_the_clamp_and_sinks_matter(ckpts):
    """The checkpoints exercise what is special: dropping sinks or the clamp changes logits."""
    hf, d = ckpts["gqa-alt"]
    ids = prompt(1, 20)
    model = load_model(str(d), "fp32").model
    base = forward_all(model, ids)
    for layer in model.layers:
        layer.attn.sinks.data.fill_(-1e9)
    assert (forward_all(model, ids) - base).abs().max() > 1e-2
    model = load_model(str(d), "fp32").model
    for experts in model.layers[0].ffn.provider.experts.values():
        for e in experts:
            e.limit = 1e9
    assert (forward_all(model, ids) - base).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_greedy_32_tokens_match_transformers(ckpts, name):
    hf, d = ckpts[name]
    ids = prompt(2, 9)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    engine = Engine(load_model(str(d), "fp32").model)
    (seq,) = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=32))
    assert seq.output_ids == ref


@pytest.mark.parametrize("name", ["gqa-alt", "gqa3-custom"])
def test_batch_of_three_equals_each_alone(ckpts, name):
    _, d = ckpts[name]
    model = load_model(str(d), "fp32").model
    prompts = [prompt(10, 5), prompt(11, 13), prompt(12, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    alone = [Engine(model).generate([p], params)[0].output_ids for p in prompts]
    together = [s.output_ids for s in Engine(model, max_prefill_tokens=7).generate(prompts, params)]
    assert together == alone


@pytest.mark.parametrize("native", [False, None])
def test_turboquant_cache_runs_close(ckpts, native):
    """TurboQuant with sinks: torch path, and the native decode step when it can be built (it
    falls back to the torch path when sinks are given). Logits close, not exact."""
    _, d = ckpts["gqa-alt"]
    model = load_model(str(d), "fp32").model
    ids = prompt(3, 24)
    ref = forward_all(model, ids)
    a = model.args
    tq = TurboQuantKVCache(a.num_layers, a.num_kv_heads, a.head_dim, bits=4.0, window=4, native=native)
    # prefill 16 tokens, then decode the rest one by one through the coded history
    tq.add_sequence(0)
    got = [model(torch.tensor(ids[:16]), torch.arange(16), tq, BatchLayout([0], [16]), all_logits=True)]
    for t in range(16, len(ids)):
        got.append(model(torch.tensor([ids[t]]), torch.tensor([t]), tq, BatchLayout([0], [1]), all_logits=True))
    got = torch.cat(got)
    err = (got - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item()
    # the same with an all-exact window equals dense
    exact = TurboQuantKVCache(a.num_layers, a.num_kv_heads, a.head_dim, bits=4.0, window=64, native=native)
    torch.testing.assert_close(forward_all(model, ids, exact), ref, atol=1e-5, rtol=1e-5)


def test_turboquant_codes_equal_dequant_reference_with_sinks(ckpts):
    """Attention straight from codes (with the sink column) == dequantize-then-attend reference."""
    _, d = ckpts["gqa3-custom"]
    model = load_model(str(d), "fp32").model
    a, ids = model.args, prompt(4, 22)
    outs = []
    for mode in ("codes", "dequant"):
        tq = TurboQuantKVCache(a.num_layers, a.num_kv_heads, a.head_dim, bits=3.0, window=3, mode=mode, native=False)
        tq.add_sequence(0)
        got = [model(torch.tensor(ids[:12]), torch.arange(12), tq, BatchLayout([0], [12]), all_logits=True)]
        for t in range(12, len(ids)):
            got.append(model(torch.tensor([ids[t]]), torch.tensor([t]), tq, BatchLayout([0], [1]), all_logits=True))
        outs.append(torch.cat(got))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_sink_attention_matches_eager_formula():
    """kvcache/sinks.py against transformers' eager formula written out (repeat K/V, cat, drop)."""
    from moemesh.kvcache.base import causal_mask
    from moemesh.kvcache.sinks import attend_with_sinks

    g = torch.Generator().manual_seed(0)
    hq, hkv, n, start, dh = 6, 2, 5, 4, 8
    q, k, v = (torch.randn(h, n_, dh, generator=g) for h, n_ in ((hq, n), (hkv, start + n), (hkv, start + n)))
    sinks = torch.randn(hq, generator=g)
    mask = causal_mask(n, start, 3)
    got = attend_with_sinks(q, k, v, mask, 0.3, sinks)
    kr, vr = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)
    w = (q @ kr.transpose(1, 2)) * 0.3 + torch.where(mask, 0.0, float("-inf"))
    w = torch.cat([w, sinks[:, None, None].expand(hq, n, 1)], dim=-1)
    ref = torch.softmax(w - w.max(-1, keepdim=True).values, dim=-1)[..., :-1] @ vr
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# -- expert store: convert + lazy -------------------------------------------------------------
LAZY_PROMPTS = [prompt(30, 25), prompt(31, 3), prompt(32, 6)]


def run_engine(model, greedy: bool) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0 if greedy else 0.9, seed=7 + i, max_tokens=8) for i in range(3)]
    return [s.output_ids for s in Engine(model).generate(LAZY_PROMPTS, params)]


@pytest.mark.parametrize("quant", ["int4", "fp32"])
def test_store_lazy_bit_identical_to_resident(ckpts, tmp_path, quant):
    """Biases and the clamped activation survive the store; lazy == resident bit for bit."""
    from moemesh.layers.gpt_oss_moe import ClampedSwiGLU
    from moemesh.loading.convert import convert
    from moemesh.loading.experts import ExpertOptions

    _, d = ckpts["gqa3-custom"]
    store = convert(d, tmp_path / "store", quant, progress=False)
    resident = load_model(str(store))
    expert = resident.provider.experts[1][0]
    assert isinstance(expert, ClampedSwiGLU) and expert.gate_up.bias is not None and expert.down.bias is not None
    ref_logits = forward_all(resident.model, LAZY_PROMPTS[0])
    if quant == "fp32":  # an fp32 store is the checkpoint itself
        assert torch.equal(ref_logits, forward_all(load_model(str(d), "fp32").model, LAZY_PROMPTS[0]))
    top_k = resident.args.top_k
    for slots, prefetch in ((top_k, True), (top_k + 1, False), (1000, True)):
        lazy = load_model(str(store), experts=ExpertOptions(slots=slots, prefetch=prefetch))
        assert torch.equal(forward_all(lazy.model, LAZY_PROMPTS[0]), ref_logits), (slots, prefetch)
        assert lazy.provider.stats()["misses"] > 0


def test_lazy_engine_runs_bit_identical(ckpts, tmp_path):
    """Whole engine runs (batched decode, greedy and sampled) through the smallest lazy cache."""
    from moemesh.loading.convert import convert
    from moemesh.loading.experts import ExpertOptions

    store = convert(ckpts["gqa3-custom"][1], tmp_path / "store", "int4", progress=False)
    resident = load_model(str(store))
    lazy = load_model(str(store), experts=ExpertOptions(slots=resident.args.top_k))
    for greedy in (True, False):
        assert run_engine(lazy.model, greedy) == run_engine(resident.model, greedy)


# -- MXFP4 checkpoints --------------------------------------------------------------------------
def test_mxfp4_dequantize_bit_exact_vs_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moemesh.quant.mxfp4 import dequantize

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=g, dtype=torch.uint8)  # [E, out, G, 16]
    scales = torch.randint(100, 150, (3, 5, 4), generator=g, dtype=torch.uint8)
    scales[0, 0, 0], scales[0, 0, 1] = 0, 255  # the extremes: subnormal and overflowing exponents
    for dtype in (torch.float32, torch.bfloat16):
        ref = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)  # [E, in, out]
        ours = dequantize(blocks, scales, dtype).transpose(1, 2)
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(dequantize(blocks, scales, torch.bfloat16).float(), dequantize(blocks, scales))


def write_mxfp4_checkpoint(hf, src, out):
    """The HF checkpoint at ``src`` with every expert matrix as MXFP4 blocks/scales (as the
    published gpt-oss checkpoints are); the HF model gets the same dequantized weights."""
    import json
    import shutil

    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moemesh.quant.mxfp4 import quantize
    from moemesh.weights.safetensors_io import SafetensorsCheckpoint, write_safetensors

    out.mkdir()
    ckpt = SafetensorsCheckpoint(src)
    tensors = []
    for name in ckpt.names():
        t = ckpt.get(name)
        if name.endswith("gate_up_proj") or name.endswith("down_proj"):
            blocks, scales = quantize(t.transpose(1, 2))  # [E, out, in] -> [E, out, in/32, 16], [E, out, in/32]
            tensors += [(name + "_blocks", blocks), (name + "_scales", scales)]
            module = hf.get_submodule(name.rsplit(".", 1)[0])
            getattr(module, name.rsplit(".", 1)[1]).data.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
        else:
            tensors.append((name, t))
    write_safetensors(out / "model.safetensors", tensors)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "generation_config.json", out / "generation_config.json")


def test_mxfp4_checkpoint_matches_transformers(tmp_path):
    from transformers import GptOssConfig

    cfg = GptOssConfig(vocab_size=V, max_position_embeddings=131072, num_hidden_layers=2, hidden_size=64,
                       intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       sliding_window=4, num_local_experts=4, num_experts_per_tok=2, rope_parameters=dict(YARN))
    hf = make_checkpoint(cfg, tmp_path / "fp32")
    write_mxfp4_checkpoint(hf, tmp_path / "fp32", tmp_path / "mxfp4")
    ids = prompt(5, 20)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = forward_all(load_model(str(tmp_path / "mxfp4"), "fp32").model, ids)
    assert (got - ref).abs().max().item() < 1e-4
    # default quant keeps MXFP4 experts as MXFP4 (BlockLinear over the blocks, gate/up de-interleaved),
    # decoding to exactly the fp32 load's weights
    auto = load_model(str(tmp_path / "mxfp4"))
    e_auto = auto.model.layers[0].ffn.provider.experts[0][1]
    e_f32 = load_model(str(tmp_path / "mxfp4"), "fp32").model.layers[0].ffn.provider.experts[0][1]
    assert auto.provider is None and e_auto.gate_up.qtype == e_auto.down.qtype == "MXFP4"
    assert torch.equal(e_auto.gate_up.dequantize(), e_f32.gate_up.weight)
    assert torch.equal(e_auto.down.dequantize(), e_f32.down.weight)
    assert torch.equal(e_auto.gate_up.bias, e_f32.gate_up.bias)
    assert (forward_all(auto.model, ids) - ref).abs().max().item() < 2e-2  # the block kernel's activation rounding
    # a bf16 expert store of it holds the same values; int4 groups requantize them (error measured)
    from moemesh.loading.convert import convert

    store = convert(tmp_path / "mxfp4", tmp_path / "store-bf16", "bf16", progress=False)
    e_fp32 = load_model(str(tmp_path / "mxfp4"), "fp32").model.layers[1].ffn.provider.experts[1][2]
    e_bf16 = load_model(str(store)).provider.experts[1][2]
    assert torch.equal(e_bf16.gate_up.dequantized_weight().float(), e_fp32.gate_up.weight)


def test_published_20b_config_reads_like_transformers():
    """gpt-oss-20b's config.json keys (old-style rope_scaling, experts_per_token): our args and
    RoPE against transformers' config and rotary embedding; no weights needed."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from moemesh.layers.rope import make_rotary
    from moemesh.models.gpt_oss import args_from_config

    cfg = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002,
           "experts_per_token": 4, "num_experts_per_tok": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
           "initial_context_length": 4096, "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
           "max_position_embeddings": 131072, "num_attention_heads": 64, "num_hidden_layers": 24, "num_key_value_heads": 8,
           "num_local_experts": 32, "rms_norm_eps": 1e-05, "rope_theta": 150000, "sliding_window": 128,
           "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                            "rope_type": "yarn", "truncate": False},
           "swiglu_limit": 7.0, "tie_word_embeddings": False, "vocab_size": 201088, "pad_token_id": 199999,
           "quantization_config": {"quant_method": "mxfp4"}}
    a = args_from_config(cfg)
    assert (a.num_experts, a.top_k, a.moe_intermediate_size, a.num_kv_heads, a.swiglu_limit) == (32, 4, 2880, 8, 7.0)
    assert a.layer_types[:2] == ["sliding_attention", "full_attention"] and a.sliding_window == 128
    hf_cfg = GptOssConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "quantization_config",
                                                                          "experts_per_token", "initial_context_length")})
    ref = GptOssRotaryEmbedding(hf_cfg)
    ours = make_rotary(a.head_dim, a.rope_theta, a.rope_scaling, a.max_position_embeddings)
    assert torch.equal(ours.inv_freq, ref.inv_freq) and ours.attention_factor == ref.attention_scaling
    pos = torch.tensor([0, 1, 77, 4095, 100000])
    cos, sin = ref(torch.zeros(1), pos[None])
    ocos, osin = ours.cos_sin(pos)
    torch.testing.assert_close(ocos[:, 0, :32], cos[0], atol=0, rtol=0)
    torch.testing.assert_close(osin[:, 0, :32], sin[0], atol=0, rtol=0)


def test_mesh_stage_slices_compose_to_the_whole_model(ckpts):
    """Two pipeline stages (layers 0:2 with the ends, 2:3) give the whole model's logits."""
    from moemesh.mesh.pipeline.slice import load_slice

    _, d = ckpts["gqa-alt"]
    ids = prompt(6, 15)
    ref = forward_all(load_model(str(d), "fp32").model, ids)
    a, b = load_slice(str(d), "0:2", "fp32"), load_slice(str(d), "2:3", "fp32", with_ends=False)
    batch, pos = BatchLayout([0], [len(ids)]), torch.arange(len(ids))
    x = a.ends.embed[torch.tensor(ids)].float()
    for stage in (a.stage, b.stage):
        cache = stage.new_cache()
        cache.add_sequence(0)
        x = stage(x, pos, cache, batch)
    torch.testing.assert_close(a.ends.head(a.ends.norm(x)), ref, atol=1e-5, rtol=1e-5)
