"""engine/decode_plan.py: one sequence's decode steps with the attention blocks as pre-bound C calls give
the eager forward's logits bit for bit (int4 trunks: SmolLM2's GGUF, an int4 MoE store with per-head q/k
norms; and a layer it cannot plan falls back to its module), and it stays out of the way elsewhere."""
from __future__ import annotations

import pytest
import torch

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


def check_same(model, prompt: list[int], n: int = 24) -> None:
    engine = Engine(model)
    assert engine.planned is not None and engine.planned.active
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
    check_same(model, [5, 9, 13, 2, 77, 31])


def test_unplannable_layers_fall_back(moe_store):
    model = load_model(str(moe_store)).model
    model.layers[1].attn.clip_qkv = 1e9  # the plan does not cover clipping: this layer runs its module
    engine = Engine(model)
    assert engine.planned.plans[0] is not None and engine.planned.plans[1] is None
    check_same(model, [5, 9, 13, 2, 77, 31])


def test_fp32_models_and_batches_use_the_modules(tiny_checkpoints):
    fp32 = load_model(str(tiny_checkpoints["qwen3_moe-norm"][1]), "fp32").model
    assert Engine(fp32).planned is None  # fp32 weights: nothing to plan
    model = load_model("smollm2", "auto").model
    engine = Engine(model)
    a, b = engine.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=6))
    ref = Engine(model, planned=False).generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=6))
    assert [a.output_ids, b.output_ids] == [r.output_ids for r in ref]
