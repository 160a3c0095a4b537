"""The fused one-token int4 SwiGLU kernel (quant/int4_ffn.c) beside its references.

Fused == the unfused path (two int4 kernel calls and torch's silu) within 1e-6 relative (only the
silu's exp differs by an ulp: measured 2e-8); one call over many experts == one call per expert bit for bit
(what keeps lazy == resident and mesh shards == one process); the MoE decode fast path ==
the grouped loop bit for bit and == the per-token reference loop within fp32 tolerance.
"""
from __future__ import annotations

import pytest
import torch

from moemesh.experts.mixing import accumulate, expert_rows, group_by_expert, mix_grouped, mix_reference
from moemesh.experts.provider import ResidentExperts
from moemesh.layers.mlp import GatedMLP, run_fused
from moemesh.quant import int4_experts as n4e
from moemesh.quant import int4_native as n4
from moemesh.quant.qlinear import QuantLinear

LIB = n4.load_native()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler (the C int4 kernel is not built)")


def expert(d: int, i: int, seed: int, mode: str = "int4", act: str = "silu") -> GatedMLP:
    g = torch.Generator().manual_seed(seed)
    gate_up = QuantLinear.from_float(torch.randn(2 * i, d, generator=g) * 0.05, None, mode, 32)
    down = QuantLinear.from_float(torch.randn(d, i, generator=g) * 0.05, None, mode, 32)
    return GatedMLP(gate_up, down, act)


# (D, I): the Qwen3-30B-A3B expert, small full blocks, a D whose down rows end in a 32-row tail block
SHAPES = [(2048, 768), (64, 32), (96, 160)]


@needs_lib
@pytest.mark.parametrize("d,i", SHAPES)
def test_fused_matches_unfused_and_is_per_expert(d: int, i: int) -> None:
    mlps = [expert(d, i, s) for s in range(5)]
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(d))
    assert all(m.fused_int4() is not None for m in mlps)
    together = run_fused(LIB, mlps, x)  # [5, D]
    one_by_one = torch.cat([m(x) for m in mlps])  # forward: the fused kernel with one expert
    assert together.shape == (5, d)
    assert torch.equal(together, one_by_one)
    assert torch.equal(run_fused(LIB, mlps[2:4], x), together[2:4])  # any subset, any order of calls
    unfused = torch.cat([m.reference_forward(x) for m in mlps])
    assert ((together - unfused).norm() / unfused.norm()).item() < 1e-6
    exact = torch.cat([torch.nn.functional.linear(
        torch.nn.functional.silu(g) * u, m.down.dequantized_weight()) for m in mlps
        for g, u in [torch.nn.functional.linear(x, m.gate_up.dequantized_weight()).chunk(2, -1)]])
    assert ((together - exact).norm() / exact.norm()).item() < 1e-4  # int8x2 activation planes


@needs_lib
def test_not_fused_when_it_cannot_be(monkeypatch: pytest.MonkeyPatch) -> None:
    assert expert(64, 48, 0).fused_int4() is None  # I not a multiple of the group size
    assert expert(64, 32, 0, act="gelu").fused_int4() is None
    assert expert(64, 32, 0, mode="int8").fused_int4() is None
    monkeypatch.setenv("MOEMESH_INT4_NATIVE", "0")
    m = expert(64, 32, 0)
    assert m.fused_int4() is None
    x = torch.randn(1, 64)
    assert torch.equal(m(x), m.reference_forward(x))  # the fallback is the unfused path


@needs_lib
def test_decode_fast_path_equals_grouped_loop_bitwise() -> None:
    """One decode token: the resident one-call C path (pointer table) == the grouped loop (one fused
    call for the token's experts, experts.mixing.expert_rows) == the loop written out per expert, bit
    for bit; == the per-token reference within fp32 tolerance."""
    d, i, e, a = 96, 64, 10, 4
    experts = [expert(d, i, s) for s in range(e)]
    prov = ResidentExperts({0: experts})
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(1, d, generator=gen)
        ids = torch.randperm(e, generator=gen)[:a][None]  # [1, A], not sorted
        w = torch.softmax(torch.randn(1, a, generator=gen), -1)
        fast = prov.run(0, x, ids, w)
        assert prov._tables[0] is not None  # the one-call path ran
        groups = group_by_expert(ids)
        rows = expert_rows([experts[g[0]] for g in groups], groups, x, w.reshape(-1))  # one fused call
        assert torch.equal(torch.cat(rows), torch.cat([experts[ex](x) * w.reshape(-1)[s, None] for ex, _, s in groups]))
        assert torch.equal(mix_grouped(x, ids, w, experts.__getitem__), fast)
        loop = torch.zeros_like(x)  # the grouped loop, written out (what LazyExperts does per expert)
        for ex, token_idx, slots in group_by_expert(ids):
            accumulate(loop, token_idx, experts[ex](x[token_idx]) * w.reshape(-1)[slots, None])
        assert torch.equal(fast, loop)
        ref = mix_reference(x, ids, w, experts.__getitem__)
        assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)


def test_fast_path_declines_unfusable_experts() -> None:
    experts = [expert(64, 32, s, mode="int8") for s in range(4)]
    x, ids, w = torch.randn(1, 64), torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]])
    prov = ResidentExperts({0: experts})
    got = prov.run(0, x, ids, w)
    assert prov._tables[0] is None  # no pointer table for int8 experts: the grouped loop ran
    assert torch.equal(got, mix_grouped(x, ids, w, experts.__getitem__))
    assert torch.allclose(got, mix_reference(x, ids, w, experts.__getitem__), rtol=1e-5, atol=1e-6)


@needs_lib
def test_run_fused_refuses_mixed_shapes() -> None:
    with pytest.raises(ValueError, match="share their shapes"):
        run_fused(LIB, [expert(64, 32, 0), expert(64, 64, 1)], torch.randn(1, 64))


def sym_expert(d: int, i: int, seed: int) -> GatedMLP:
    """An expert with symmetric int4 (GGUF Q4_0's values): scales alone."""
    g = torch.Generator().manual_seed(seed)

    def lin(n: int, k: int) -> QuantLinear:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        s = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
        return QuantLinear.from_int4_groups(q, s, -8 * s, None)  # zero 0: symmetric

    return GatedMLP(lin(2 * i, d), lin(d, i))


@needs_lib
@pytest.mark.parametrize("d,i,sym", [(2048, 768, False), (96, 160, False), (64, 32, True), (96, 160, True)])
def test_one_call_mix_equals_fused_outputs_summed_in_order(d: int, i: int, sym: bool) -> None:
    """mix_fused (experts + weighted sum in C) == sum_in_order over run_fused's rows, bit for bit,
    including a D whose down rows are padded; moe_decode_table (sort by id, gather from the pointer
    table, mix) == the Python path it replaced (sorted ids, run_fused, sum_in_order)."""
    from moemesh.experts.mixing import expert_table, sum_in_order
    from moemesh.layers.mlp import mix_fused

    make = sym_expert if sym else expert
    mlps = [make(d, i, s) for s in range(6)]
    assert all(m.fused_int4() is not None for m in mlps) and mlps[0].gate_up.symmetric == sym
    g = torch.Generator().manual_seed(i)
    x = torch.randn(1, d, generator=g)
    w = torch.rand(4, generator=g)
    picked = [mlps[e] for e in (4, 1, 5, 0)]
    want = sum_in_order(x, run_fused(LIB, picked, x), w)
    assert torch.equal(mix_fused(LIB, picked, x, w), want)

    table = expert_table(mlps)
    e0 = mlps[0]
    args = (table, e0.down.in_features, e0.gate_up.qweight.shape[0], e0.down.qweight.shape[0], e0.gate_up.kernel_fmt())
    ids = torch.tensor([[5, 0, 3, 1]])
    weights = torch.rand(1, 4, generator=g)
    order = sorted(range(4), key=ids[0].tolist().__getitem__)
    ref = sum_in_order(x, run_fused(LIB, [mlps[ids[0, a]] for a in order], x), weights[0, order])
    assert torch.equal(n4e.moe_decode_table(LIB, x, ids, weights, *args), ref)
    other = n4e.moe_decode_table(LIB, x, torch.tensor([[5, 0, 3, 2]]), weights, *args)
    assert not torch.equal(other, ref)  # the table lookup follows the ids
    with pytest.raises(ValueError, match="outside"):
        n4e.moe_decode_table(LIB, x, torch.tensor([[5, 0, 3, 6]]), weights, *args)


@needs_lib
def test_resident_provider_decodes_one_token_through_the_pointer_table() -> None:
    """ResidentExperts.run for one token takes the pointer-table C call (the compiled graph's op):
    the grouped loop's bits; rebuilt after the experts' scales change layout."""
    from moemesh.experts.provider import ResidentExperts

    experts = {3: [expert(96, 160, s) for s in range(6)]}
    prov = ResidentExperts(experts)
    g = torch.Generator().manual_seed(7)
    x, ids, w = torch.randn(1, 96, generator=g), torch.tensor([[4, 1, 5]]), torch.rand(1, 3, generator=g)
    want = mix_grouped(x, ids, w, experts[3].__getitem__)
    assert torch.equal(prov.run(3, x, ids, w), want)
    assert prov._tables[3] is not None  # the table path ran
    for e in experts[3]:
        e.use_block_scales()
    prov.forget_kernel_tables()
    assert torch.equal(prov.run(3, x, ids, w), want) and prov._tables[3][5] & n4.FMT_BLOCKS
    two = torch.randn(2, 96, generator=g)  # more than one token: the grouped loop
    assert torch.equal(prov.run(3, two, ids.repeat(2, 1), w.repeat(2, 1)),
                       mix_grouped(two, ids.repeat(2, 1), w.repeat(2, 1), experts[3].__getitem__))


def test_resident_provider_with_held_experts_keeps_the_grouped_loop() -> None:
    """A mesh shard's provider holds a dict of some experts (no expert 0 here): no table, no lookup of 0."""
    from moemesh.experts.provider import ResidentExperts

    held = {3: {2: expert(64, 32, 2), 5: expert(64, 32, 5)}}
    prov = ResidentExperts(held)
    x, ids, w = torch.randn(1, 64), torch.tensor([[5, 2]]), torch.rand(1, 2)
    assert torch.equal(prov.run(3, x, ids, w), mix_grouped(x, ids, w, held[3].__getitem__))
    assert prov._tables[3] is None


@needs_lib
@pytest.mark.parametrize("d,i,sym", [(96, 160, False), (64, 32, True)])
def test_batched_tokens_in_one_call_equal_the_grouped_loop(d: int, i: int, sym: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Several tokens (a batched decode step, a short prompt chunk): ResidentExperts.run's one C call
    (i4_moe_batch: group by expert id, each expert over its tokens, weighted rows added in id order) ==
    the grouped loop bit for bit, with experts shared between tokens, unused ones, and a block-scale
    layout; == the per-token reference within fp32 tolerance."""
    experts = {0: [expert(d, i, s) for s in range(7)]}
    if sym:
        for e in experts[0]:
            e.use_block_scales()
    prov = ResidentExperts(experts)
    calls = []
    real = n4e.moe_batch_table
    monkeypatch.setattr(n4e, "moe_batch_table", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    g = torch.Generator().manual_seed(11)
    for t in (2, 5, 33):
        x = torch.randn(t, d, generator=g)
        ids = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(t)])  # [T, 3]
        w = torch.softmax(torch.randn(t, 3, generator=g), -1)
        got = prov.run(0, x, ids, w)
        assert calls[-1] == t  # the one-call path ran
        assert torch.equal(got, mix_grouped(x, ids, w, experts[0].__getitem__))
        assert torch.allclose(got, mix_reference(x, ids, w, experts[0].__getitem__), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        real(LIB, x, torch.full_like(ids, 9), w, *prov._decode_table(0)[1:])
