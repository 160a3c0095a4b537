"""The block-format C kernels (quant/blocks_matmul.c) against their reference, every qtype.

Reference: gguf.quants.dequantize (fp8.dequantize for FP8) then an fp32 matmul (BlockLinear.reference_forward).

Tolerance, per output element y[m, n] (integer types):
    |y - ref| <= 0.5 * sum_g du[m, g] * sum_{k in g} |W[n, k]|  +  1e-5 * sum_k |x[m, k]| |W[n, k]|
The first term is the worst case of the kernel's only approximation, the int16 activations
(x = du * X + e, |e| <= du / 2, du = amax of the group of 32 / 32767); the second covers fp32
rounding on both sides (the kernel's fp32 lanes and the reference matmul), ~100x looser than what
it needs here. Measured: the whole error is ~5e-6 of sum |x| |W| (random rows), i.e. ~16-bit activations,
like the int4 kernel's two int8 planes. FP8 is an fp32 path: only the second term.

Bitwise: the AVX2 build == the portable scalar build; row i of an M-row call == row i alone; a subset of
weight rows == those columns of the full call; 1 thread == 2 threads (batch invariance).
"""
from __future__ import annotations

import pytest
import torch

from block_rows import random_rows
from moemesh.quant import blocks_native as bn
from moemesh.quant import fp8
from moemesh.quant.blocks import BlockLinear, block_size, supported_qtypes

SIMD, SCALAR = bn.load_build(False), bn.load_build(True)
needs_lib = pytest.mark.skipif(SIMD is None or SCALAR is None, reason="no C compiler")
MS = (1, 2, 3, 8, 17, 64, 300)


def ks(qtype: str) -> tuple[int, ...]:
    """K at the minimum and over several blocks (and a partial last chunk of 8 groups for 32-blocks)."""
    if qtype == fp8.QTYPE:
        return 128, 300  # 300: a zero-padded last block
    b = block_size(qtype)[0]
    return (b, 3 * b) if b == 256 else (b, 11 * b)


def bound(x: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
    """The stated tolerance [M, N] (module docstring)."""
    aw = w.abs()
    fp = 1e-5 * (x.abs() @ aw.T)
    if qtype == fp8.QTYPE:
        return fp
    m, k = x.shape
    du = x.view(m, k // 32, 32).abs().amax(-1) / 32767  # [M, G]
    return 0.5 * du @ aw.view(-1, k // 32, 32).sum(-1).T + fp


def case(qtype: str, n: int, k: int, seed: int) -> tuple[BlockLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = BlockLinear(qtype, random_rows(qtype, n, k, seed), k, torch.randn(n, generator=g))
    return lin, torch.randn(max(MS), k, generator=g) * torch.rand(max(MS), 1, generator=g) * 4


@needs_lib
@pytest.mark.parametrize("qtype", supported_qtypes())
def test_kernel_vs_reference_and_builds(qtype: str) -> None:
    for k in ks(qtype):
        lin, xs = case(qtype, 13, k, k)  # 13 rows: a partial tile of 4
        w = lin.dequantize()
        for m in MS:
            x = xs[:m]
            y = bn.matmul(SIMD, qtype, x, lin.raw, k, lin.bias)
            assert torch.equal(y, bn.matmul(SCALAR, qtype, x, lin.raw, k, lin.bias)), (qtype, k, m)
            ref = lin.reference_forward(x)
            err = (y - ref).abs()
            assert (err <= bound(x, w, qtype)).all(), (qtype, k, m, (err / bound(x, w, qtype)).max().item())


@needs_lib
@pytest.mark.parametrize("qtype", supported_qtypes())
def test_batch_invariance(qtype: str) -> None:
    k = ks(qtype)[-1]
    lin, xs = case(qtype, 37, k, 3)
    full = bn.matmul(SIMD, qtype, xs, lin.raw, k, lin.bias)  # M = 300
    for i in (0, 5, 63, 64, 299):  # first row, inside a tile, around the 64-row tile edge, last
        assert torch.equal(bn.matmul(SIMD, qtype, xs[i:i + 1], lin.raw, k, lin.bias)[0], full[i])
    assert torch.equal(bn.matmul(SIMD, qtype, xs[7:10], lin.raw, k, lin.bias), full[7:10])
    part = bn.matmul(SIMD, qtype, xs[:8], lin.raw[5:18], k, lin.bias[5:18])  # a view: row stride kept
    assert torch.equal(part, full[:8, 5:18])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bn.matmul(SIMD, qtype, xs, lin.raw, k, lin.bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


@needs_lib
def test_block_linear_forward_uses_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    lin, xs = case("Q4_K", 9, 512, 0)
    x = xs[:3].view(3, 1, 512)
    assert torch.equal(lin(x), bn.matmul(SIMD, "Q4_K", xs[:3], lin.raw, 512, lin.bias).view(3, 1, 9))
    monkeypatch.setenv("MOEMESH_BLOCKS_SCALAR", "1")
    assert torch.equal(lin(x).view(3, 9), bn.matmul(SCALAR, "Q4_K", xs[:3], lin.raw, 512, lin.bias))
    monkeypatch.setenv("MOEMESH_BLOCKS_NATIVE", "0")
    assert torch.equal(lin(x).view(3, 9), lin.reference_forward(xs[:3]))


@needs_lib
def test_extreme_codes_do_not_overflow() -> None:
    """Largest codes and activations at +-amax everywhere: the int32 group dots stay exact."""
    k = 256
    for qtype in ("Q8_0", "IQ4_XS", "Q6_K", "MXFP4"):
        raw = random_rows(qtype, 4, k, 1)
        if qtype == "Q8_0":
            raw.view(4, -1, 34)[:, :, 2:] = 0x80  # -128
        lin = BlockLinear(qtype, raw, k)
        x = torch.full((2, k), 3.0)
        x[1] = -3.0
        y = bn.matmul(SIMD, qtype, x, raw, k, None)
        assert torch.equal(y, bn.matmul(SCALAR, qtype, x, raw, k, None))
        ref = lin.reference_forward(x)
        assert ((y - ref).abs() <= bound(x, lin.dequantize(), qtype)).all()


@needs_lib
def test_bad_arguments_are_rejected() -> None:
    raw = random_rows("Q4_K", 2, 256)
    with pytest.raises(ValueError, match="rejected"):
        bn.matmul(SIMD, "Q4_K", torch.zeros(1, 200), raw, 200, None)  # K not a multiple of 256
    assert bn.matmul(SIMD, "Q4_K", torch.zeros(0, 256), raw, 256, None).shape == (0, 2)
