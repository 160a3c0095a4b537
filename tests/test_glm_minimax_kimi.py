"""glm4_moe, glm_moe_dsa (GLM-5's sparse attention), minimax_m2 and Kimi K2.5's text model vs
transformers on tiny random checkpoints (fp32): prefill logits, 32 greedy tokens, batched == alone,
lazy experts == resident bit for bit."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import UnsupportedArchitecture
from moemesh.layers.grouped_router import GroupedRouter
from moemesh.loading.convert import convert
from moemesh.loading.loader import load_model
from moemesh.models import get_arch
from tiny_families import V, check_lazy_equals_resident, make_kimi_k25, make_text_checkpoint, text_configs

NAMES = [*text_configs(), "kimi_k25"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name, cfg in text_configs().items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (make_text_checkpoint(cfg, d), d)
    d = tmp_path_factory.mktemp("kimi_k25")
    out["kimi_k25"] = (make_kimi_k25(d), d)
    return out


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill(model, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_match_transformers(ckpts, name):
    hf, d = ckpts[name]
    ids = prompt(1, 17)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    got = prefill(load_model(str(d), "fp32").model, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4  # measured ~1e-7


@pytest.mark.parametrize("name", NAMES)
def test_greedy_32_tokens_match_transformers(ckpts, name):
    hf, d = ckpts[name]
    ids = prompt(2, 9)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False)[0, len(ids):].tolist()
    (seq,) = Engine(load_model(str(d), "fp32").model).generate([ids], SamplingParams(temperature=0.0, max_tokens=32))
    assert seq.output_ids == ref
    assert len(set(ref)) > 3  # not a constant stream


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_three_equals_each_alone(ckpts, name):
    model = load_model(str(ckpts[name][1]), "fp32").model
    prompts = [prompt(10, 5), prompt(11, 13), prompt(12, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    alone = [Engine(model).generate([p], params)[0].output_ids for p in prompts]
    assert [s.output_ids for s in Engine(model).generate(prompts, params)] == alone


@pytest.mark.parametrize("name", NAMES)
def test_lazy_experts_bit_identical_to_resident(ckpts, tmp_path, name):
    check_lazy_equals_resident(ckpts[name][1], tmp_path)


def test_kimi_checkpoint_reads_back_in_transformers(ckpts):
    """The tiny Kimi K2.5 file is in the published layout: transformers loads it to the same logits."""
    from transformers import Kimi_K25ForConditionalGeneration

    hf, d = ckpts["kimi_k25"]
    again = Kimi_K25ForConditionalGeneration.from_pretrained(d).eval()
    ids = torch.tensor([prompt(3, 7)])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=0, atol=0)


def test_kimi_store_trunk_under_canonical_names(ckpts, tmp_path):
    from moemesh.weights.safetensors_io import SafetensorsCheckpoint

    store = convert(ckpts["kimi_k25"][1], tmp_path / "store", "int4", progress=False)
    names = SafetensorsCheckpoint(store).names()
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert not any(".experts." in n for n in names)
    assert any(n.startswith("vision_tower.") for n in names)  # kept for image input


def test_minimax_router_matches_transformers():
    from transformers import AutoConfig
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

    cfg = AutoConfig.for_model("minimax_m2", hidden_size=24, num_local_experts=16, num_experts_per_tok=4,
                               bos_token_id=1, eos_token_id=2)
    args = get_arch("minimax_m2").args_from_config(cfg.to_dict())
    ref = MiniMaxM2TopKRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        ref.weight.normal_(0, 0.5)
    bias = torch.randn(16) * 0.2
    x = torch.randn(64, 24)
    _, ref_w, ref_ids = ref(x, bias)
    ids, w = GroupedRouter(ref.weight.data, 4, args.routing, bias)(x)
    ro, oo = ref_ids.sort(dim=-1), ids.sort(dim=-1)
    assert torch.equal(ro.values, oo.values)
    torch.testing.assert_close(ref_w.gather(1, ro.indices), w.gather(1, oo.indices))


def test_partial_rotary_and_layer_rules():
    glm = get_arch("glm4_moe").args_from_config(text_configs()["glm4_moe"].to_dict())
    assert (glm.head_dim, glm.rotary_dim, glm.moe_layers) == (12, 6, [1, 2])
    assert glm.shared_expert_intermediate_size == 16 and glm.routing.n_group == 2
    mm = get_arch("minimax_m2").args_from_config(text_configs()["minimax_m2"].to_dict())
    assert (mm.rotary_dim, mm.qk_norm, mm.moe_layers) == (8, "full", [0, 1])
    with pytest.raises(UnsupportedArchitecture, match="compressed-tensors"):
        get_arch("kimi_k25").args_from_config({"text_config": {}, "quantization_config": {"quant_method": "compressed-tensors"}})


@pytest.mark.parametrize("name", NAMES)
def test_plan_shape_counts_every_parameter(ckpts, name):
    """`moemesh plan`'s count of a config (ArchSpec.shape) equals the transformers model's own
    parameter count (text model; correction biases are buffers there, counted too)."""
    from moemesh.benchkit.shapes import shape_from_config

    hf, d = ckpts[name]
    text = hf.model.language_model if name == "kimi_k25" else hf.model
    n = sum(p.numel() for p in text.parameters()) + hf.lm_head.weight.numel()
    n += sum(b.numel() for k, b in text.named_buffers() if k.endswith("e_score_correction_bias"))
    import json

    assert shape_from_config(json.loads((d / "config.json").read_text())).total_params == n


def test_glm5_sparse_selection_matters_and_caches(ckpts):
    """The tiny GLM-5 keeps 5 keys per query: keeping them all changes the logits past 5 tokens (so the
    parity above exercises the selection); its cache holds the indexer keys; TurboQuant is refused."""
    import dataclasses

    model = load_model(str(ckpts["glm_moe_dsa"][1]), "fp32").model
    ids = prompt(4, 12)
    sparse = prefill(model, ids)
    for layer in model.layers:
        if layer.attn.indexer is not None:
            layer.attn.indexer.topk = 1000
    dense = prefill(model, ids)
    torch.testing.assert_close(sparse[:5], dense[:5], atol=1e-6, rtol=1e-6)  # up to 5 keys: nothing dropped
    assert (sparse[5:] - dense[5:]).abs().max() > 1e-3
    cache = model.new_cache()
    cache.add_sequence(0)
    model(torch.tensor(ids), torch.arange(12), cache, BatchLayout([0], [12]))
    a = model.args
    assert cache.keys.nbytes() == 2 * 16 * a.index_head_dim * 4  # 2 full layers, capacity 16 fp32 keys
    assert dataclasses.replace(a).index_topk == 5
    with pytest.raises(ValueError, match="dense KV cache"):
        model.new_cache("turboquant:3.5")
