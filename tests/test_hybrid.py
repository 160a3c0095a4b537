"""Hybrid linear attention (qwen3_next, qwen3_5_moe's text model) vs transformers on tiny random
checkpoints (fp32), and the recurrent state behind the cache interface: chunked prefill carries
the same state as one-shot prefill, batched == alone, mixed prefill/decode batches, lazy experts
bit-identical to resident ones, TurboQuant KV on the attention layers."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.compiled import unsupported_reason
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kvcache.recurrent import HybridCache
from moemesh.layers import delta_rule
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from tiny_families import V, check_lazy_equals_resident, make_qwen3_5_moe, make_text_checkpoint

NAMES = ["qwen3_next", "qwen3_next-gqa-dense", "qwen3_5_moe", "qwen3_5_moe-per-expert"]


def qwen3_next_configs() -> dict[str, object]:
    from transformers import AutoConfig

    common = dict(vocab_size=V, max_position_embeddings=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, linear_key_head_dim=8, linear_value_head_dim=6, num_experts_per_tok=2)
    return {
        "qwen3_next": AutoConfig.for_model(
            "qwen3_next", **common, num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, num_experts=8, linear_num_value_heads=4, linear_num_key_heads=2),
        # value heads 3x the key heads, a dense first layer, full attention every other layer, no top-k renorm
        "qwen3_next-gqa-dense": AutoConfig.for_model(
            "qwen3_next", **common, num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=12,
            shared_expert_intermediate_size=20, num_experts=6, linear_num_value_heads=6, linear_num_key_heads=2,
            mlp_only_layers=[0], norm_topk_prob=False, layer_types=["linear_attention", "full_attention"] * 2,
            linear_conv_kernel_dim=3),
    }


def make_qwen3_next(cfg, d):
    model = make_text_checkpoint(cfg, d)
    with torch.no_grad():  # (1 + w) norms: random w around 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "linear_attn" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(d)
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name, cfg in qwen3_next_configs().items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (make_qwen3_next(cfg, d), d)
    d = tmp_path_factory.mktemp("qwen3_5_moe")
    out["qwen3_5_moe"] = (make_qwen3_5_moe(d, fused=True), d)
    d = tmp_path_factory.mktemp("qwen3_5_moe-per-expert")
    out["qwen3_5_moe-per-expert"] = (make_qwen3_5_moe(d, fused=False, seed=1), d)
    return out


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def forward(model, ids: list[int], cache, sid: int = 0, start: int = 0) -> torch.Tensor:
    return model(torch.tensor(ids), torch.arange(start, start + len(ids)), cache, BatchLayout([sid], [len(ids)]),
                 all_logits=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [17, 150])  # 150: more than two of the delta rule's 64-token chunks
def test_prefill_logits_match_transformers(ckpts, name, n):
    hf, d = ckpts[name]
    ids = prompt(1, n)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]  # [T, V]
    model = load_model(str(d), "fp32").model
    cache = model.new_cache()
    assert isinstance(cache, HybridCache)
    cache.add_sequence(0)
    got = forward(model, ids, cache)
    assert (got - ref).abs().max().item() < 1e-4  # measured ~1e-7


@pytest.mark.parametrize("name", NAMES)
def test_greedy_32_tokens_match_transformers(ckpts, name):
    hf, d = ckpts[name]
    ids = prompt(5, 9)  # a prompt whose greedy continuation varies on every tiny model here
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False)[0, len(ids):].tolist()
    (seq,) = Engine(load_model(str(d), "fp32").model).generate([ids], SamplingParams(temperature=0.0, max_tokens=32))
    assert seq.output_ids == ref
    assert len(set(ref)) > 3


@pytest.mark.parametrize("name", ["qwen3_next-gqa-dense", "qwen3_5_moe"])
def test_batch_of_three_equals_each_alone(ckpts, name):
    model = load_model(str(ckpts[name][1]), "fp32").model
    prompts = [prompt(10, 5), prompt(11, 13), prompt(12, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    alone = [Engine(model).generate([p], params)[0].output_ids for p in prompts]
    assert [s.output_ids for s in Engine(model).generate(prompts, params)] == alone


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe"])
def test_chunked_prefill_state_equals_one_shot(ckpts, name):
    """A 100-token prompt fed in chunks of 9 (beside an unrelated sequence in the same steps) leaves
    the same recurrent states, KV length and logits as one forward over the whole prompt."""
    model = load_model(str(ckpts[name][1]), "fp32").model
    ids = prompt(3, 100)
    one = model.new_cache()
    one.add_sequence(0)
    ref = forward(model, ids, one)
    chunked = model.new_cache()
    chunked.add_sequence(5)
    chunked.add_sequence(6)
    rows = []
    for step, start in enumerate(range(0, len(ids), 9)):
        part, other = ids[start : start + 9], prompt(40 + step, 2)
        pos = list(range(start, start + len(part))) + [2 * step, 2 * step + 1]
        out = model(torch.tensor(part + other), torch.tensor(pos), chunked, BatchLayout([5, 6], [len(part), 2]),
                    all_logits=True)
        rows.append(out[: len(part)])
    torch.testing.assert_close(torch.cat(rows), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(one.states.seqs[0], chunked.states.seqs[5]):
        torch.testing.assert_close(b.ssm, a.ssm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.conv, a.conv, atol=1e-5, rtol=1e-5)
    assert one.length(0) == chunked.length(5) == 100
    # and through the engine: a 16-token prefill budget decodes the same greedy tokens as 512
    params = SamplingParams(temperature=0.0, max_tokens=6)
    big = Engine(model, max_prefill_tokens=512).generate([ids], params)[0].output_ids
    assert Engine(model, max_prefill_tokens=16).generate([ids], params)[0].output_ids == big


def test_mixed_prefill_and_decode_logits_match(ckpts):
    model = load_model(str(ckpts["qwen3_5_moe"][1]), "fp32").model
    a, b = prompt(20, 7), prompt(21, 4)
    cache = model.new_cache()
    for sid in (0, 1):
        cache.add_sequence(sid)
    forward(model, a, cache)
    mixed = model(torch.tensor([3] + b), torch.tensor([7, 0, 1, 2, 3]), cache, BatchLayout([0, 1], [1, 4]))
    solo = model.new_cache()
    solo.add_sequence(0)
    forward(model, a, solo)
    ref_a = model(torch.tensor([3]), torch.tensor([7]), solo, BatchLayout([0], [1]))
    solo.add_sequence(1)
    ref_b = model(torch.tensor(b), torch.arange(4), solo, BatchLayout([1], [4]))
    torch.testing.assert_close(mixed, torch.cat([ref_a, ref_b]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe", "qwen3_5_moe-per-expert"])
def test_lazy_experts_bit_identical_to_resident(ckpts, tmp_path, name):
    check_lazy_equals_resident(ckpts[name][1], tmp_path)


def test_turboquant_on_the_attention_layers(ckpts):
    """TurboQuant codes for the attention layers' K/V (decode steps attend from the codes)."""
    model = load_model(str(ckpts["qwen3_5_moe"][1]), "fp32").model
    ids = prompt(5, 40)

    def run(cache) -> torch.Tensor:  # prefill, then 4 decode steps fed fixed tokens: [44, V]
        cache.add_sequence(0)
        outs = [forward(model, ids, cache)]
        outs += [forward(model, [(7 * i + 5) % V], cache, start=len(ids) + i) for i in range(4)]
        return torch.cat(outs)

    dense = model.new_cache()
    ref = run(dense)
    torch.testing.assert_close(run(model.new_cache("turboquant:4:64")), ref, atol=1e-5, rtol=1e-5)  # all in the window
    small = model.new_cache("turboquant:3.5:4")
    got = run(small)
    assert (got - ref).abs().max() > 0 and small.nbytes() < dense.nbytes()


def test_cache_holds_kv_only_for_attention_layers(ckpts):
    model = load_model(str(ckpts["qwen3_next"][1]), "fp32").model
    cache = model.new_cache()
    assert cache.kv.num_layers == 1 and cache.states.num_layers == 3  # layer_types: 3 linear, 1 full
    cache.add_sequence(0)
    forward(model, prompt(6, 16), cache)
    c = model.args.linear_attn
    state = 4 * (c.conv_dim * (c.conv_kernel - 1) + c.num_v_heads * c.k_dim * c.v_dim)
    kv = 4 * 16 * 2 * model.args.num_kv_heads * model.args.head_dim  # 16 tokens of K and V, one layer
    assert cache.nbytes() == 3 * state + kv
    cache.free_sequence(0)
    assert cache.nbytes() == 0
    assert unsupported_reason(model) is not None  # the compiled decode step refuses it (eager runs)


@pytest.mark.parametrize("n", [1, 5, 64, 130])
def test_chunked_delta_rule_equals_recurrent(n):
    torch.manual_seed(n)
    h, k_dim, v_dim = 3, 8, 6
    q = torch.nn.functional.normalize(torch.randn(n, h, k_dim), dim=-1) * k_dim**-0.5
    k = torch.nn.functional.normalize(torch.randn(n, h, k_dim), dim=-1)
    v, g, beta = torch.randn(n, h, v_dim), -torch.nn.functional.softplus(torch.randn(n, h)), torch.rand(n, h)
    s0 = torch.randn(h, k_dim, v_dim)
    o1, s1 = delta_rule.recurrent(q, k, v, g, beta, s0)
    o2, s2 = delta_rule.chunked(q, k, v, g, beta, s0, chunk=16)
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=1e-5, rtol=1e-5)


def test_layer_major_prefill_equals_chunked(ckpts, tmp_path):
    """Lazy experts from a store: layer-major prefill (each linear layer takes the prompt's chunks in
    order, its state carried chunk to chunk) gives chunked prefill's logits bit for bit."""
    store = convert(ckpts["qwen3_5_moe"][1], tmp_path / "store", "int4", progress=False)
    model = load_model(str(store), experts=ExpertOptions(slots=4)).model
    ids = prompt(7, 70)
    out = {}
    for mode in ("chunked", "layer"):
        eng = Engine(model, max_prefill_tokens=16, prefill=mode)
        assert eng.layer_major == (mode == "layer")
        seen: list[torch.Tensor] = []
        sample = eng.sampler.sample

        def spy(logits, *args, _sample=sample, _seen=seen, **kwargs):
            _seen.append(logits.clone())
            return _sample(logits, *args, **kwargs)

        eng.sampler.sample = spy  # type: ignore[method-assign]
        tokens = eng.generate([ids], SamplingParams(temperature=0.0, max_tokens=6))[0].output_ids
        out[mode] = (seen[0], tokens)
    assert torch.equal(out["layer"][0], out["chunked"][0]) and out["layer"][1] == out["chunked"][1]


def test_mesh_stage_slices_compose_to_the_whole_model(ckpts):
    """Two pipeline stages of the hybrid stack (layers 0:2, then 2:4: linear, linear | linear, full)
    give the whole model's logits over a prefill and decode steps; each stage caches its own kinds."""
    from moemesh.mesh.pipeline.slice import load_slice

    d = ckpts["qwen3_5_moe"][1]
    model = load_model(str(d), "fp32").model
    ids = prompt(8, 15)
    whole = model.new_cache()
    whole.add_sequence(0)
    ref = [forward(model, ids, whole)] + [forward(model, [9 + i], whole, start=15 + i) for i in range(3)]
    a, b = load_slice(str(d), "0:2", "fp32"), load_slice(str(d), "2:4", "fp32", with_ends=False)
    caches = [a.stage.new_cache(), b.stage.new_cache()]
    assert caches[0].kv.num_layers == 0 and caches[1].kv.num_layers == 1 and caches[1].states.num_layers == 1
    for c in caches:
        c.add_sequence(0)
    got = []
    for toks, start in [(ids, 0)] + [([9 + i], 15 + i) for i in range(3)]:
        x = a.ends.embed[torch.tensor(toks)].float()
        batch, pos = BatchLayout([0], [len(toks)]), torch.arange(start, start + len(toks))
        for stage, c in zip((a.stage, b.stage), caches):
            x = stage(x, pos, c, batch)
        got.append(a.ends.head(a.ends.norm(x)))
    torch.testing.assert_close(torch.cat(got), torch.cat(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_next-gqa-dense", "qwen3_5_moe"])
def test_plan_shape_counts_every_parameter(ckpts, name):
    """`moemesh plan`'s count (models/qwen3_next.hybrid_shape) equals the transformers model's text parameters."""
    import json

    from moemesh.benchkit.shapes import shape_from_config

    hf, d = ckpts[name]
    n = sum(p.numel() for k, p in hf.named_parameters() if "visual" not in k)
    assert shape_from_config(json.loads((d / "config.json").read_text())).total_params == n
