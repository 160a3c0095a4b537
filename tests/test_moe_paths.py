"""Grouped expert mixing vs the per-token, per-slot reference loop."""
from __future__ import annotations

import torch

from moemesh.experts.mixing import group_by_expert, mix_grouped, mix_reference
from moemesh.experts.provider import ResidentExperts
from moemesh.layers.mlp import GatedMLP
from moemesh.layers.router import TopKRouter
from moemesh.quant.qlinear import QuantLinear


def experts(n: int, d: int, i: int, seed: int = 0) -> list[GatedMLP]:
    g = torch.Generator().manual_seed(seed)
    return [
        GatedMLP(QuantLinear.from_float(torch.randn(2 * i, d, generator=g), None, "fp32"),
                 QuantLinear.from_float(torch.randn(d, i, generator=g), None, "fp32"))
        for _ in range(n)
    ]


def test_group_by_expert_covers_every_slot_once():
    ids = torch.tensor([[3, 1], [1, 0], [3, 2]])
    groups = group_by_expert(ids)
    assert [e for e, _, _ in groups] == [0, 1, 2, 3]
    slots = torch.cat([s for _, _, s in groups]).sort().values
    assert slots.tolist() == list(range(6))
    for e, tok, s in groups:
        assert (ids.reshape(-1)[s] == e).all() and (s // 2 == tok).all()


def test_grouped_equals_reference_loop():
    torch.manual_seed(0)
    ex = experts(6, 16, 24)
    x = torch.randn(9, 16)
    router = TopKRouter(torch.randn(6, 16), top_k=3, norm_topk_prob=True)
    ids, w = router(x)
    got = mix_grouped(x, ids, w, ex.__getitem__)
    ref = mix_reference(x, ids, w, ex.__getitem__)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got.abs().sum() > 0


def test_resident_provider_reference_flag():
    ex = experts(4, 8, 12, seed=1)
    x = torch.randn(5, 8)
    ids = torch.randint(0, 4, (5, 2))
    w = torch.rand(5, 2)
    fast = ResidentExperts({0: ex}).run(0, x, ids, w)
    slow = ResidentExperts({0: ex}, reference=True).run(0, x, ids, w)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_router_matches_softmax_topk_definition():
    w = torch.randn(5, 8)
    x = torch.randn(3, 8)
    probs = torch.softmax(x @ w.T, dim=-1)
    top, idx = probs.topk(2, dim=-1)
    ids, weights = TopKRouter(w, 2, norm_topk_prob=False)(x)
    assert torch.equal(ids, idx)
    torch.testing.assert_close(weights, top)
    _, wn = TopKRouter(w, 2, norm_topk_prob=True)(x)
    torch.testing.assert_close(wn, top / top.sum(-1, keepdim=True))
