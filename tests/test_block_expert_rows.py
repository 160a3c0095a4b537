"""Block-format experts inside the MoE loop (experts/mixing.expert_rows): one decode token through a
layer's GatedMLP / ClampedSwiGLU experts over BlockLinear weights takes one blocks_ffn.experts_mix call,
and every expert's row has the bits that expert's own forward gives (so lazy == resident and the
per-expert path stay exact). The modules' forward is blocks_ffn.expert_forward (the C activation) for
every M, so a token's row does not depend on how many tokens ran with it.
"""
from __future__ import annotations

import pytest
import torch

from moemesh.experts import mixing
from moemesh.layers.gpt_oss_moe import ClampedSwiGLU
from moemesh.layers.mlp import GatedMLP
from moemesh.quant import blocks_ffn
from moemesh.quant import blocks_native as bn
from moemesh.quant.block_samples import random_rows
from moemesh.quant.blocks import BlockLinear, concat_rows

needs_lib = pytest.mark.skipif(bn.load_build(False) is None, reason="no C compiler")


def module(kind: str, qtype: str, d: int, i: int, seed: int) -> GatedMLP:
    g = torch.Generator().manual_seed(seed)
    bias = (lambda n: torch.randn(n, generator=g)) if kind == "gpt_oss" else (lambda n: None)
    gate = BlockLinear(qtype, random_rows(qtype, i, d, seed), d, bias(i))
    up = BlockLinear(qtype, random_rows(qtype, i, d, seed + 1), d, bias(i))
    down = BlockLinear(qtype, random_rows(qtype, d, i, seed + 2), i, bias(d))
    gate_up = concat_rows([gate, up])
    return ClampedSwiGLU(gate_up, down, 1.702, 7.0) if kind == "gpt_oss" else GatedMLP(gate_up, down, "silu")


@needs_lib
@pytest.mark.parametrize("kind,qtype,d,i", [("silu", "Q4_K", 256, 512), ("gpt_oss", "MXFP4", 96, 64)])
def test_one_token_is_one_fused_call_with_each_experts_bits(kind: str, qtype: str, d: int, i: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    mlps = [module(kind, qtype, d, i, 10 * e) for e in range(5)]
    ids = torch.tensor([[3, 0, 4, 1]])  # [T=1, A=4]
    weights = torch.softmax(torch.randn(1, 4), -1)
    x = torch.randn(1, d)
    groups = mixing.group_by_expert(ids)
    flat_w = weights.reshape(-1)
    chosen = [mlps[e] for e, _, _ in groups]
    calls = []
    real = blocks_ffn.experts_mix
    monkeypatch.setattr(blocks_ffn, "experts_mix", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    fused = mixing.expert_rows(chosen, groups, x, flat_w)
    assert calls == [4]  # one call for the layer's four experts
    alone = [m(x[t]) * flat_w[s, None] for m, (_, t, s) in zip(chosen, groups)]
    for a, b in zip(fused, alone):
        assert torch.equal(a, b)
    # each module is blocks_ffn.expert_forward, for one row and for many (a row alone == that row in a batch)
    xs = torch.randn(9, d)
    for m in chosen:
        ref = blocks_ffn.expert_forward(xs, (m.gate_up, m.down), *m.block_act())
        assert torch.equal(m(xs), ref)
        assert torch.equal(m(xs[4:5]), ref[4:5])


def test_mixed_formats_fall_back_to_one_call_per_expert() -> None:
    a, b = module("silu", "Q4_K", 256, 512, 1), module("silu", "Q8_0", 256, 512, 2)
    assert mixing.block_rows([a, b], torch.randn(1, 256)) is None  # different qtypes cannot share a call
    assert mixing.block_rows([a, a], torch.randn(1, 256)) is not None
