"""Fused int4 experts with an epilogue (int4_kernel.h i4_epi): gpt-oss's clamped SwiGLU with biased linears.

The fused one-token call, the unfused rows (gate_up + its bias, the C act, down + its bias), the one-call
MoE layer (one token and T tokens) and the grouped loop give the same bits; every SIMD build gives the
scalar build's bits (the clamp and the exp's far ends included); and all of it stays within the int4
kernel's own error of transformers' operations in torch (ClampedSwiGLU.reference_forward).
"""
from __future__ import annotations

import pytest
import torch

from moemesh.experts.mixing import expert_table, mix_grouped, sum_in_order
from moemesh.experts.provider import ResidentExperts
from moemesh.layers.gpt_oss_moe import ClampedSwiGLU
from moemesh.layers.mlp import GatedMLP, fused_table, run_fused
from moemesh.quant import int4_experts as n4e
from moemesh.quant import int4_native as n4
from moemesh.quant.qlinear import QuantLinear

LIB = n4.load_native()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler (the C int4 kernel is not built)")


def clamped(d: int, i: int, seed: int, scale: float = 1.0, bias: bool = True, limit: float = 7.0) -> ClampedSwiGLU:
    g = torch.Generator().manual_seed(seed)
    gb = torch.randn(2 * i, generator=g) * 0.3 if bias else None
    db = torch.randn(d, generator=g) * 0.1 if bias else None
    gate_up = QuantLinear.from_float(torch.randn(2 * i, d, generator=g) * 0.3 * scale, gb, "int4", 32)
    down = QuantLinear.from_float(torch.randn(d, i, generator=g) * 0.05, db, "int4", 32)
    return ClampedSwiGLU(gate_up, down, alpha=1.702, limit=limit)


@needs_lib
@pytest.mark.parametrize("d,i", [(64, 32), (96, 160), (2880 // 10 * 2, 96)])
def test_fused_clamped_experts_equal_the_unfused_rows_and_stay_near_torch(d: int, i: int) -> None:
    mlps = [clamped(d, i, s) for s in range(4)]
    assert all(m.fused_int4() is not None and m._epilogue is not None for m in mlps)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(d)) * 2
    one = run_fused(LIB, mlps, x[:1])  # [4, D] one call
    assert torch.equal(one, torch.cat([m(x[:1]) for m in mlps]))  # each expert alone: the same bits
    rows = torch.cat([m(x)[:1] for m in mlps])  # three rows through the unfused path (act_rows): row 0 the same
    assert torch.equal(one, rows)
    h = mlps[0].gate_up(x[:1])[0]
    assert (h[:i] > 7).any() and (h[i:].abs() > 7).any()  # the clamps engage
    ref = torch.cat([m.reference_forward(x[:1]) for m in mlps])  # torch's clamp, sigmoid and order
    assert ((one - ref).norm() / ref.norm()).item() < 1e-5  # the exp's ulps, requantized by down


@needs_lib
def test_one_call_moe_layer_with_an_epilogue_is_the_grouped_loop() -> None:
    """ResidentExperts over clamped, biased experts: the one-token pointer-table call and the T-token batch
    call == the grouped loop over each expert's forward, bit for bit; the graph op declines them."""
    d, i = 96, 64
    experts = [clamped(d, i, s) for s in range(6)]
    prov = ResidentExperts({0: experts})
    g = torch.Generator().manual_seed(5)
    x, ids, w = torch.randn(1, d, generator=g), torch.tensor([[4, 1, 5]]), torch.rand(1, 3, generator=g)
    order = sorted(range(3), key=ids[0].tolist().__getitem__)
    want = sum_in_order(x, torch.cat([experts[ids[0, a]](x) for a in order]), w[0, order])
    assert torch.equal(prov.run(0, x, ids, w), want)
    assert prov._tables[0] is not None and prov._tables[0][6] is not None  # the table path, with its epilogue
    xs = torch.randn(5, d, generator=g)
    picks = torch.tensor([[0, 2, 5], [5, 1, 3], [2, 0, 4], [1, 3, 0], [4, 5, 2]])
    ws = torch.rand(5, 3, generator=g)
    grouped = mix_grouped(xs, picks, ws, experts.__getitem__)
    assert torch.equal(prov.run(0, xs, picks, ws), grouped)  # i4_moe_batch with the epilogue
    assert isinstance(prov.decode_op(0), str) and expert_table(experts) is None


@needs_lib
def test_mixed_acts_or_biases_do_not_share_a_call() -> None:
    plain = GatedMLP(QuantLinear.from_float(torch.randn(64, 64) * 0.05, None, "int4", 32),
                     QuantLinear.from_float(torch.randn(64, 32) * 0.05, None, "int4", 32))
    assert plain.fused_int4() is not None and plain._epilogue is None  # a plain SwiGLU: no epilogue
    assert fused_table([plain, clamped(64, 32, 0)]) is None
    unbiased = clamped(64, 32, 1, bias=False)
    assert unbiased._epilogue is None or unbiased._epilogue.bias is None  # the act alone
    table = fused_table([unbiased, clamped(64, 32, 2)])  # one biased, one not: zero addresses for the latter
    assert table is not None and table[6].bias is not None and table[6].bias[0].tolist() == [0, 0]


def simd(isa: str):
    lib = n4.load_variant(isa)
    if lib is None:
        pytest.skip(f"this CPU has no {isa}")
    return lib


@pytest.mark.skipif(n4.load_variant("scalar") is None, reason="no C compiler")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("scale", [1.0, 400.0])
def test_clamped_act_bits_equal_the_scalar_build(isa: str, scale: float) -> None:
    """Every build's epilogue gives the scalar build's bits: moderate pre-activations, and ones of several
    hundred (the clamp at limit, exp(-(g * alpha)) at its far ends); the one-call layer and the act rows."""
    lib, ref = simd(isa), n4.load_variant("scalar")
    mlps = [clamped(96, 160, s, scale=scale) for s in range(4)]
    for m in mlps:
        m.fused_int4()
    ptrs = [m._kernel_ptrs for m in mlps]
    gu_npad, dn_npad, fmt = mlps[0].gate_up.qweight.shape[0], mlps[0].down.qweight.shape[0], mlps[0].gate_up.kernel_fmt()
    epi = n4e.epilogue(mlps[0].kernel_act(), [m._kernel_bias for m in mlps])
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(1))
    y = n4e.experts_ffn_ptrs(ref, x, 160, ptrs, gu_npad, dn_npad, fmt, epi)
    assert torch.isfinite(y).all()
    assert torch.equal(n4e.experts_ffn_ptrs(lib, x, 160, ptrs, gu_npad, dn_npad, fmt, epi), y)
    ids, w = torch.tensor([[3, 0, 2]]), torch.rand(1, 3)
    args = (torch.tensor(ptrs, dtype=torch.int64), 160, gu_npad, dn_npad, fmt, epi)
    assert torch.equal(n4e.moe_decode_table(lib, x, ids, w, *args), n4e.moe_decode_table(ref, x, ids, w, *args))
    h = torch.randn(4, 2 * 160 + 16) * scale
    act = mlps[0].kernel_act()
    assert torch.equal(n4e.act_rows(lib, h.clone(), 160, act), n4e.act_rows(ref, h.clone(), 160, act))
