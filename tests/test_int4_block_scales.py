"""Block-major int4 scales (int4_kernel.h FMT_BLOCKS, QuantLinear.use_block_scales) beside torch's
layout: the same values at other addresses, so every kernel gives the same bits, and the torch
paths (prefill's dequantized weight, export_state) still see torch's layout."""
from __future__ import annotations

import pytest
import torch

from moemesh.experts.mixing import expert_table
from moemesh.layers.mlp import mix_fused, run_fused
from moemesh.quant import int4_experts as n4e
from moemesh.quant import int4_native as n4
from moemesh.quant.qlinear import QuantLinear
from moemesh.quant.qlinear_state import export_state
from test_int4_ffn import expert, sym_expert

LIB = n4.load_native()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler (the C int4 kernel is not built)")


def sym_linear(n: int, k: int, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
    return QuantLinear.from_int4_groups(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8), s, -8 * s, None)


def linears() -> list[QuantLinear]:
    """Full blocks only, a 16-, 32- and 48-row tail block; asymmetric and symmetric."""
    g = torch.Generator().manual_seed(0)
    asym = [QuantLinear.from_float(torch.randn(n, k, generator=g), None, "int4") for n, k in
            ((128, 64), (80, 96), (96, 128), (176, 64))]
    return asym + [sym_linear(n, k, i) for i, (n, k) in enumerate(((64, 32), (208, 96)))]


@pytest.mark.parametrize("sym", [False, True])
def test_block_layout_round_trips_and_groups_each_block(sym: bool) -> None:
    for n_pad, g in ((64, 3), (80, 2), (176, 5), (128, 1)):
        sz = torch.arange(g * n_pad * (1 if sym else 2)).to(torch.bfloat16).view(g, n_pad, *(() if sym else (2,)))
        flat = n4.block_scales(sz)
        assert flat.shape == (sz.numel(),)
        assert torch.equal(n4.unblock_scales(flat, g, n_pad, sym), sz)
        sw = 1 if sym else 2
        first = flat[: g * min(64, n_pad) * sw].view(g, min(64, n_pad), sw)  # block 0 is one contiguous run
        assert torch.equal(first, sz.reshape(g, n_pad, sw)[:, :64])


@needs_lib
def test_block_scales_give_the_same_bits_in_every_path() -> None:
    g = torch.Generator().manual_seed(1)
    for lin in linears():
        xs = [torch.randn(m, lin.in_features, generator=g) for m in (1, 3, 40)]
        before = [lin(x) for x in xs]
        sz, q, w = lin.torch_scales_and_zeros().clone(), lin.int4_scales().data_ptr(), lin.dequantized_weight()
        state = {k: v.clone() for k, v in export_state(lin)[1].items()}  # (views of the buffers)
        assert lin.use_block_scales() and lin.scale_blocks and lin.int4_scales().dim() == 1
        assert lin.int4_scales().data_ptr() == q  # rewritten in place (an arena or a blob keeps it)
        assert lin.kernel_fmt() & n4.FMT_BLOCKS and bool(lin.kernel_fmt() & n4.FMT_SYM) == lin.symmetric
        assert all(torch.equal(a, lin(x)) for a, x in zip(before, xs))
        assert torch.equal(lin.torch_scales_and_zeros(), sz)
        assert torch.equal(lin.dequantized_weight(), w)  # torch's paths (prefill) read torch's layout back
        assert all(torch.equal(a, b) for a, b in zip(state.values(), export_state(lin)[1].values()))
        with pytest.raises(ValueError, match="do not match"):  # block-major scales named as torch's
            n4.int4_matmul(LIB, xs[0], lin.qweight, lin.int4_scales(), lin.kernel_fmt() & n4.FMT_SYM)


@needs_lib
@pytest.mark.parametrize("make,d,i", [(expert, 96, 160), (expert, 2048, 768), (sym_expert, 96, 160)])
def test_fused_experts_with_block_scales_give_the_same_bits(make, d: int, i: int) -> None:
    mlps = [make(d, i, s) for s in range(4)]
    g = torch.Generator().manual_seed(d)
    x, w = torch.randn(1, d, generator=g), torch.rand(3, generator=g)
    ffn, mix = run_fused(LIB, mlps, x), mix_fused(LIB, mlps[:3], x, w)
    ids, weights = torch.tensor([[3, 0, 2]]), torch.rand(1, 3, generator=g)

    def via_table() -> torch.Tensor:
        e = mlps[0]
        return n4e.moe_decode_table(LIB, x, ids, weights, expert_table(mlps), e.down.in_features,
                                   e.gate_up.qweight.shape[0], e.down.qweight.shape[0], e.gate_up.kernel_fmt())

    table_out = via_table()
    mlps[0].use_block_scales()
    with pytest.raises(ValueError, match="scale layouts"):  # one call, one format
        run_fused(LIB, mlps, x)
    for m in mlps[1:]:
        m.use_block_scales()
    assert mlps[0]._kernel_key[2] & n4.FMT_BLOCKS
    assert torch.equal(run_fused(LIB, mlps, x), ffn)
    assert torch.equal(mix_fused(LIB, mlps[:3], x, w), mix)
    assert torch.equal(via_table(), table_out)
