"""Symmetric int4 (GGUF Q4_0's values: scales only, 18 bytes per 32 weights) against the same
weights stored asymmetric with zero 0 (scale, zero pairs: 20 bytes): the kernel skips only the zero
term, fma(0, sum x, acc) == acc, so every path must give the same values bit for bit."""
from __future__ import annotations

import pytest
import torch

from moemesh.experts.mixing import sum_in_order
from moemesh.layers.mlp import GatedMLP, run_fused
from moemesh.quant import int4_native as n4
from moemesh.quant.qlinear import QuantLinear
from moemesh.quant.qlinear_state import export_state, from_state

LIB = n4.load_native()


def q4_0_pair(n: int, k: int, seed: int) -> tuple[QuantLinear, QuantLinear]:
    """(symmetric, asymmetric with zeros 0) QuantLinears of one random Q4_0 weight [n, k]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 0.001).bfloat16().float()  # [n, k/32]
    sym = QuantLinear.from_int4_groups(q, d, -8 * d, None)
    asym = QuantLinear(k, n, "int4", None)._set_int4(q.to(torch.int32), d, torch.zeros_like(d), 32)
    return sym, asym


@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768), (112, 96), (40, 64)])  # 112/40: tail blocks, padding
def test_symmetric_equals_zero_asymmetric(n: int, k: int) -> None:
    sym, asym = q4_0_pair(n, k, n + k)
    assert sym.symmetric and not asym.symmetric
    assert tuple(sym.scales.shape) == (k // 32, sym.qweight.shape[0])
    assert sym.nbytes() * 20 == asym.nbytes() * 18  # 16 + 2 vs 16 + 4 bytes per 32 weights
    assert torch.equal(sym.dequantized_weight(), asym.dequantized_weight())
    for m in (1, 2, 5):  # the kernel's single and paired row tiles
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert torch.equal(sym(x), asym(x))
        ref = sym.reference_forward(x)  # fp32 x @ W.T; the kernel's ~16-bit activations: ~2e-5 of max
        assert (sym(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    for min_m in (1, 1 << 62):  # torch's kernel (scale, 0) pairs built per call; dequant path
        sym.dequant_min_m = asym.dequant_min_m = min_m
        if LIB is None or min_m == 1:
            x = torch.randn(3, k)
            assert torch.equal(sym(x), asym(x))


def test_symmetric_state_round_trip_and_old_metas() -> None:
    sym, asym = q4_0_pair(64, 128, 7)
    meta, tensors = export_state(sym)
    assert meta["symmetric"] is True and set(tensors) == {"qweight", "scales"}
    back = from_state(meta, tensors)
    x = torch.randn(1, 128)
    assert back.symmetric and torch.equal(back(x), sym(x))
    meta_a, tensors_a = export_state(asym)
    assert "symmetric" not in meta_a and set(tensors_a) == {"qweight", "scales_and_zeros"}  # v1 stores read as before
    assert not from_state(meta_a, tensors_a).symmetric


@pytest.mark.skipif(LIB is None, reason="no C compiler (the C int4 kernel is not built)")
def test_fused_experts_symmetric_equal_asymmetric() -> None:
    d, inter = 256, 96  # inter 96: gate_up 192 rows = three blocks; down 256 rows
    mlps = {}
    for kind in (0, 1):
        mlps[kind] = [GatedMLP(q4_0_pair(2 * inter, d, 10 + e)[kind], q4_0_pair(d, inter, 20 + e)[kind]) for e in range(3)]
    x = torch.randn(1, d)
    ys, ya = run_fused(LIB, mlps[0], x), run_fused(LIB, mlps[1], x)
    assert torch.equal(ys, ya)
    for e, m in enumerate(mlps[0]):
        assert torch.equal(m(x), ys[e : e + 1])
        ref = m.reference_forward(x)
        assert (m(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match="symmetric and asymmetric"):
        run_fused(LIB, [mlps[0][0], mlps[1][1]], x)
    w = torch.tensor([0.5, 0.3, 0.2])
    assert torch.equal(sum_in_order(x, ys, w), sum_in_order(x, ya, w))
