"""engine/decode_plan.py: one sequence's decode steps with the attention blocks as pre-bound C calls give
the eager forward's logits bit for bit (int4 trunks: SmolLM2's GGUF, an int4 MoE store with per-head q/k
norms; and a layer it cannot plan falls back to its module), and it stays out of the way elsewhere.
engine/decode_step.py: a fully planned model's layers as one C call give the per-layer loop's bits."""
from __future__ import annotations

import pytest
import torch

from moemesh.engine.decode_plan import PlannedDecode
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.convert import convert
from moemesh.loading.loader import load_model
from moemesh.quant import decode_kernels, int4_native

pytestmark = pytest.mark.skipif(decode_kernels.load() is None or int4_native.load_native() is None,
                                reason="no native kernels on this machine")


def logits_per_step(model, planned: bool, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    engine = Engine(model, planned=planned)
    seen: list[torch.Tensor] = []
    real = engine._sample

    def keep(seqs, ready, logits):
        seen.append(logits.clone())
        return real(seqs, ready, logits)

    engine._sample = keep  # type: ignore[method-assign]
    (seq,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n))
    return seq.output_ids, seen


def check_same(model, prompt: list[int], n: int = 24, one_call: bool = True) -> None:
    engine = Engine(model)
    assert engine.planned is not None and engine.planned.active
    assert (engine.planned.table is not None) == one_call  # all layers planned: one C call per token
    ids_a, la = logits_per_step(model, True, prompt, n)
    ids_b, lb = logits_per_step(model, False, prompt, n)
    assert ids_a == ids_b and len(la) == len(lb) == n
    for a, b in zip(la, lb):
        assert torch.equal(a, b)


def test_smollm2_gguf_bit_exact():
    model = load_model("smollm2", "auto").model
    check_same(model, list(range(200, 240)))


@pytest.fixture(scope="module")
def moe_store(tmp_path_factory):
    """A tiny Qwen3-MoE (per-head q/k norms) whose trunk the int4 kernels read (widths multiples of 32)."""
    from tiny import configs, make_checkpoint

    cfg = configs()["qwen3_moe-norm"]
    cfg.hidden_size, cfg.head_dim, cfg.moe_intermediate_size, cfg.intermediate_size = 64, 16, 32, 64
    root = tmp_path_factory.mktemp("plan")
    make_checkpoint(cfg, root / "hf")
    return convert(root / "hf", root / "store", "int4", progress=False, trunk_quant="int4")


def test_int4_moe_store_with_head_norms_bit_exact(moe_store):
    model = load_model(str(moe_store)).model
    assert model.layers[0].attn.qk_norm == "head"
    assert Engine(model).planned.ffns[0].moe  # resident int4 experts: the one-call MoE layer
    check_same(model, [5, 9, 13, 2, 77, 31])


def test_lazy_experts_bit_exact(moe_store):
    from moemesh.loading.experts import ExpertOptions

    model = load_model(str(moe_store), experts=ExpertOptions(slots=5)).model  # experts read while decoding
    check_same(model, [5, 9, 13, 2, 77, 31], one_call=False)  # (lazy experts: the module's MoE forward)


def test_unplannable_layers_fall_back(moe_store):
    model = load_model(str(moe_store)).model
    model.layers[1].attn.clip_qkv = 1e9  # the plan does not cover clipping: this layer runs its module
    engine = Engine(model)
    assert engine.planned.plans[0] is not None and engine.planned.plans[1] is None
    check_same(model, [5, 9, 13, 2, 77, 31], one_call=False)  # a layer outside the plan: the per-layer loop


def test_fp32_models_and_batches_use_the_modules(tiny_checkpoints):
    fp32 = load_model(str(tiny_checkpoints["qwen3_moe-norm"][1]), "fp32").model
    assert Engine(fp32).planned is None  # fp32 weights: nothing to plan
    model = load_model("smollm2", "auto").model
    engine = Engine(model)
    a, b = engine.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=6))
    ref = Engine(model, planned=False).generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=6))
    assert [a.output_ids, b.output_ids] == [r.output_ids for r in ref]


def one_call_vs_loop(model, prompt: list[int], n: int) -> None:
    """The same engine's decode steps with the table (one C call per token) and with the per-layer loop."""
    engine = Engine(model)
    assert engine.planned.table is not None
    runs = []
    for one_call in (True, False):
        engine.planned = PlannedDecode(model, one_call=one_call)
        seen: list[torch.Tensor] = []
        real = Engine._sample.__get__(engine)
        engine._sample = lambda seqs, ready, logits: (seen.append(logits.clone()), real(seqs, ready, logits))[1]
        (seq,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n))
        runs.append((seq.output_ids, seen))
    (ids_a, la), (ids_b, lb) = runs
    assert ids_a == ids_b and len(la) == len(lb) == n
    assert all(torch.equal(a, b) for a, b in zip(la, lb))


def test_one_call_gives_the_per_layer_loops_bits_as_the_cache_grows(moe_store):
    """40 tokens from a 6-token prompt: the KV buffers are replaced several times (16, then a quarter
    more each time), so the table reads their new addresses."""
    one_call_vs_loop(load_model(str(moe_store)).model, [5, 9, 13, 2, 77, 31], 40)


def test_one_call_dense_mlp_gives_the_per_layer_loops_bits():
    one_call_vs_loop(load_model("smollm2", "auto").model, list(range(300, 320)), 12)


def test_one_call_names_the_layer_that_failed(moe_store):
    from moemesh.batch import BatchLayout

    model = load_model(str(moe_store)).model
    table = Engine(model).planned.table
    cache = model.new_cache("dense")
    cache.add_sequence(0)
    cache.begin(BatchLayout([0], [1]))  # buffers for a few tokens
    cos, sin = model.rope.cos_sin(torch.tensor([0]))
    x = torch.zeros(1, model.embed.shape[1])
    with pytest.raises(ValueError, match="attention failed at layer 0, position 1000000"):
        table.run(x, cos, sin, cache, 0, 10**6, 1)  # a position past the buffers


def batched_logits(model, planned: bool, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    engine = Engine(model, planned=planned)
    seen: list[torch.Tensor] = []
    real = engine._sample
    engine._sample = lambda seqs, ready, logits: (seen.append(logits.clone()), real(seqs, ready, logits))[1]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n))
    return [o.output_ids for o in outs], seen


@pytest.mark.parametrize("which", ["moe", "smollm2"])
def test_batched_decode_steps_in_one_call_give_the_modules_bits(which, moe_store):
    """Steps of several sequences in decode run as one C call (dk_decode_layers_batch); each row's logits
    are the modules' batched forward's bits (planned=False), through KV buffers replaced as they grow."""
    model = load_model(str(moe_store)).model if which == "moe" else load_model("smollm2", "auto").model
    assert Engine(model).planned.table is not None
    prompts = [[5, 9, 13, 2], [77], [31, 4, 8], [2, 2, 2, 2, 2, 2, 2], [40, 41]]
    n = 40 if which == "moe" else 12
    ids_a, la = batched_logits(model, True, prompts, n)
    ids_b, lb = batched_logits(model, False, prompts, n)
    assert ids_a == ids_b and len(la) == len(lb) == n
    assert all(torch.equal(a, b) for a, b in zip(la, lb))


@pytest.fixture(scope="module")
def gpt_oss_store(tmp_path_factory):
    """A tiny gpt-oss (biased q/k/v/o, sinks, sliding and full layers, biased top-k-then-softmax router,
    clamped SwiGLU experts with biases) as an int4 store with an int4 trunk (widths multiples of 32)."""
    from test_gpt_oss import configs as gpt_oss_configs
    from test_gpt_oss import make_checkpoint as gpt_oss_checkpoint

    cfg = gpt_oss_configs()["gqa-alt"]
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads = 64, 64, 16, 4
    root = tmp_path_factory.mktemp("plan-gpt-oss")
    gpt_oss_checkpoint(cfg, root / "hf")
    return convert(root / "hf", root / "store", "int4", progress=False, trunk_quant="int4")


def test_gpt_oss_int4_store_decodes_in_one_call_bit_exact(gpt_oss_store):
    """Every gpt-oss layer is planned (biases added as QuantLinear adds them, sinks, windows, its router and
    experts' act in C): one C call per token == the per-layer loop == the eager forward, bit for bit; and
    the batched step == the modules' batched forward."""
    model = load_model(str(gpt_oss_store)).model
    layer = model.layers[0]
    assert layer.attn.qkv.bias is not None and layer.attn.sinks is not None and layer.ffn.provider._decode_table(0)[6]
    assert {lay.attn.window for lay in model.layers} == {4, None}  # sliding and full layers
    prompt = [5, 9, 13, 2, 77, 31, 8, 100, 3]  # longer than the window
    check_same(model, prompt, n=20)
    one_call_vs_loop(model, prompt, 20)
    prompts = [[5, 9, 13, 2], [77], [31, 4, 8, 6, 6, 6], [40, 41]]
    ids_a, la = batched_logits(model, True, prompts, 16)
    ids_b, lb = batched_logits(model, False, prompts, 16)
    assert ids_a == ids_b and all(torch.equal(a, b) for a, b in zip(la, lb))


@pytest.fixture(scope="module")
def block_ggufs(tmp_path_factory):
    """Tiny whole GGUFs in the flagship formats: Qwen3-MoE with Q4_K experts and trunk, gpt-oss with
    MXFP4 experts, biases and sinks (benchkit/synth/whole.py's tiny shapes)."""
    from moemesh.benchkit.synth import whole, whole_write

    root = tmp_path_factory.mktemp("block-gguf")
    return {name: whole_write.write(whole.tiny_spec(name), root, progress=False)
            for name in ("qwen3-30b-a3b", "gpt-oss-120b")}


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gpt-oss-120b"])
@pytest.mark.parametrize("lazy", [False, True], ids=["resident", "lazy"])
def test_block_format_gguf_bit_exact(block_ggufs, name, lazy, monkeypatch):
    """A GGUF's block-format projections as planned bk_matmul calls and its experts (resident or read
    from the file while decoding) behind the router's C call: the eager forward's logits, every step."""
    from moemesh.engine.decode_plan import FfnPlan, _BlockMatmul
    from moemesh.loading.experts import ExpertOptions

    model = load_model(str(block_ggufs[name]), "auto", experts=ExpertOptions(slots=5) if lazy else None).model
    planned = Engine(model).planned
    assert all(isinstance(p.qkv, _BlockMatmul) for p in planned.plans)  # every layer planned, block formats
    assert all(isinstance(f, FfnPlan) and f.routed for f in planned.ffns)
    calls = []
    real = FfnPlan.__call__
    monkeypatch.setattr(FfnPlan, "__call__", lambda self, x, threads: (calls.append(1), real(self, x, threads))[1])
    check_same(model, [5, 9, 13, 2, 77, 31, 100, 7], n=16, one_call=False)  # (no int4 table: the per-layer loop)
    assert len(calls) == 15 * len(model.layers)  # the planned run's 15 decode steps went through the plan


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gpt-oss-120b"])
def test_block_mix_is_the_per_expert_loop(block_ggufs, name):
    """One decode token through a layer's block-format experts in one C call that also weights and sums
    them (mixing.block_mix, what ResidentExperts and LazyExperts run) gives the bits of each expert's own
    forward, weighted, added in expert-id order."""
    from moemesh.experts.mixing import block_mix, group_by_expert

    model = load_model(str(block_ggufs[name]), "auto").model
    provider = next(layer.ffn.provider for layer in model.layers if hasattr(layer.ffn, "provider"))
    layer, held = next(iter(provider.experts.items()))
    g = torch.Generator().manual_seed(3)
    top_k = model.args.top_k
    for _ in range(3):
        x = torch.randn(1, held[0].down.out_features, generator=g)  # [1, D]
        ids = torch.randperm(len(held), generator=g)[:top_k].reshape(1, -1)  # [1, A], distinct
        w = torch.softmax(torch.randn(1, top_k, generator=g), -1)  # [1, A]
        ref = torch.zeros_like(x)
        for e, slot in sorted((int(e), j) for j, e in enumerate(ids[0])):
            ref.add_(held[e](x) * w[0, slot])
        groups = group_by_expert(ids)
        assert torch.equal(block_mix([held[e] for e, _, _ in groups], groups, x, w.reshape(-1)), ref)
        assert torch.equal(provider.run(layer, x, ids, w), ref)
