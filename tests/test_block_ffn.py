"""Block-format experts (quant/blocks_ffn.py, blocks_ffn.c): the fused one-token call vs the per-expert path.

Bitwise: experts_mix == the per-expert path (expert_forward per expert, then experts/mixing.sum_in_order)
for SwiGLU and gpt-oss's clamped SwiGLU, with and without biases, any subset of experts, 1 or 2
threads, the AVX2 and the scalar build. Against fp32 references (dequantized weights, torch's
activations): the C activation within 1e-6 relative (its exp polynomial is ~2 ulp), whole experts within
1e-4 relative (the matmuls' int16 activations, tests/test_block_kernels.py).
"""
from __future__ import annotations

import pytest
import torch

from moemesh.experts.mixing import sum_in_order
from moemesh.quant import blocks_native as bn
from moemesh.quant.block_samples import random_rows
from moemesh.quant.blocks import BlockLinear, concat_rows
from moemesh.quant.blocks_ffn import activation, expert_forward, experts_mix, fusable

needs_lib = pytest.mark.skipif(bn.load_build(False) is None, reason="no C compiler")
# (gate_up qtype, down qtype, D, I, biases, act): gpt-oss MXFP4 (D with a partial 8-group chunk), the
# Q4_K_M mix (Q4_K gate/up, Q6_K down), Q8_0, FP8 (padded last block)
CASES = [("MXFP4", "MXFP4", 96, 64, True, "gpt_oss_swiglu"), ("Q4_K", "Q6_K", 256, 512, False, "silu"),
         ("Q8_0", "Q8_0", 64, 96, True, "silu"), ("FP8_E4M3_B128", "FP8_E4M3_B128", 200, 136, False, "gpt_oss_swiglu")]


def make_expert(gq: str, dq: str, d: int, i: int, bias: bool, seed: int) -> tuple[BlockLinear, BlockLinear]:
    g = torch.Generator().manual_seed(seed)
    b = (lambda n: torch.randn(n, generator=g)) if bias else (lambda n: None)
    gate = BlockLinear(gq, random_rows(gq, i, d, seed), d, b(i))
    up = BlockLinear(gq, random_rows(gq, i, d, seed + 100), d, b(i))
    down = BlockLinear(dq, random_rows(dq, d, i, seed + 200), i, b(d))
    return concat_rows([gate, up]), down


def per_expert(x, experts, w, act):
    ys = torch.cat([expert_forward(x, e, act) for e in experts])
    return ys, sum_in_order(x, ys, w)


@needs_lib
@pytest.mark.parametrize("gq,dq,d,i,bias,act", CASES)
def test_fused_equals_per_expert_path(gq, dq, d, i, bias, act, monkeypatch) -> None:
    experts = [make_expert(gq, dq, d, i, bias, s) for s in range(5)]
    assert fusable(experts)
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(d)) * 2
    w = torch.softmax(torch.randn(5), 0)
    ys, mixed = per_expert(x, experts, w, act)
    assert torch.equal(experts_mix(x, experts, None, act), ys)
    assert torch.equal(experts_mix(x, experts, w, act), mixed)
    assert torch.equal(experts_mix(x, experts[3:5], None, act), ys[3:5])  # any subset: per-expert bits
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(experts_mix(x, experts, w, act), mixed)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("MOEMESH_BLOCKS_NATIVE", "scalar")  # the portable build: the same bits
    assert torch.equal(experts_mix(x, experts, w, act), mixed)
    assert torch.equal(per_expert(x, experts, w, act)[1], mixed)
    # fp32 reference: dequantized weights and torch's activations
    ref = []
    for gu, dn in experts:
        h = x @ gu.dequantize().T + (0 if gu.bias is None else gu.bias)
        g, u = h.chunk(2, -1)
        a = torch.nn.functional.silu(g) * u if act == "silu" else \
            (u.clamp(-7, 7) + 1) * (g.clamp(max=7) * torch.sigmoid(g.clamp(max=7) * 1.702))
        ref.append(a @ dn.dequantize().T + (0 if dn.bias is None else dn.bias))
    ref = torch.cat(ref)
    assert ((ys - ref).norm() / ref.norm()).item() < 1e-4


@needs_lib
def test_activation_matches_torch() -> None:
    h = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([0.0, -0.0, 1e-30, -87.5, 88.5, 7.0, 7.5])])
    h = torch.stack([h, h.flip(0)]).repeat(1, 2)  # [2, 2I]: gate = h, up = a reversed copy
    g, u = h.chunk(2, -1)
    silu = activation(h, "silu")
    ref = torch.nn.functional.silu(g.double()) * u.double()
    assert ((silu.double() - ref).abs() <= 1e-6 * ref.abs() + 1e-30).all()
    gc, uc = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
    ref = ((uc + 1) * (gc * torch.sigmoid(gc * 1.702))).double()  # layers/gpt_oss_moe.ClampedSwiGLU's operations
    clamped = activation(h, "gpt_oss_swiglu")
    assert ((clamped.double() - ref).abs() <= 1e-6 * ref.abs() + 1e-30).all()
    assert torch.equal(activation(h[1:], "silu"), silu[1:])  # per element: no dependence on M
    with pytest.raises(ValueError, match="not supported"):
        activation(h, "gelu")


@needs_lib
def test_unfusable_experts_fall_back_to_the_per_expert_path() -> None:
    a = make_expert("Q8_0", "Q8_0", 64, 32, False, 1)
    b = make_expert("Q4_0", "Q8_0", 64, 32, False, 2)  # another gate_up qtype
    assert not fusable([a, b])
    x = torch.randn(1, 64)
    w = torch.tensor([0.3, 0.7])
    ys, mixed = per_expert(x, [a, b], w, "silu")
    assert torch.equal(experts_mix(x, [a, b], w), mixed)
    with pytest.raises(ValueError, match="weights"):
        experts_mix(x, [a, b], torch.ones(3))
    with pytest.raises(ValueError, match="one token"):
        experts_mix(torch.randn(2, 64), [a], None)
    assert torch.equal(experts_mix(x, [], torch.ones(0)), torch.zeros(1, 64))  # no expert picked: zeros
    assert experts_mix(x, [], None).shape == (0, 64)
