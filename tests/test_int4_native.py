"""The C int4 kernel (layers/int4_matmul.c): reference agreement, batch invariance, fallbacks.

Measured (torch 2.13, AVX-512 VNNI EPYC): vs x @ W_dequant.T in fp32 the kernel's relative error
is ~2.2e-5 (two int8 activation planes, exact integer dots, fp32 output), torch's bf16 kernel's
~2.3e-3 (bf16 activations and output); see bench/results/int4_kernel.md.
"""
from __future__ import annotations

import pytest
import torch

from moemesh.quant import int4_native as n4
from moemesh.quant.int4_pack import unpack_int4
from moemesh.quant.qlinear import QuantLinear

LIB = n4.load_native()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler (the C int4 kernel is not built)")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def layer(n: int, k: int, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    return QuantLinear.from_float(torch.randn(n, k, generator=g), torch.randn(n, generator=g), "int4", 32)


# (N, K): full 64-row blocks only, blocks + a 32-row tail block, a tail block only (48 rows)
SHAPES = [(128, 256), (96, 512), (48, 128), (200, 64)]


@needs_lib
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_and_fp32(n: int, k: int, dtype: torch.dtype) -> None:
    ql = layer(n, k, n + k)
    assert n4.supports(ql._int4_layout, ql.group_size, k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = n4.int4_matmul(LIB, x, ql.qweight, ql.scales_and_zeros)  # [5, N_pad]
    n_pad = ql.qweight.shape[0]
    q = unpack_int4(ql.qweight, n_pad, k, *ql._int4_layout)
    ref = n4.reference_int4_matmul(x, q, ql.scales_and_zeros)  # same arithmetic, other summation order
    assert y.shape == (5, n_pad) and y.dtype == torch.float32
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    exact = x.float() @ ql.dequantized_weight().t()  # [5, N]
    assert rel_err(y[:, :n], exact) < 1e-4  # measured ~2.2e-5
    torch_kernel = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), ql.qweight, 32, ql.scales_and_zeros).float()
    assert rel_err(y[:, :n], exact) < rel_err(torch_kernel[:, :n], exact) / 10


@needs_lib
@pytest.mark.parametrize("n,k", SHAPES)
def test_rows_identical_for_any_batch(n: int, k: int) -> None:
    """Batch invariance: a row's output bits do not depend on M or on the other rows."""
    ql = layer(n, k, 7)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 3, 7)[:, None]
    y7 = n4.int4_matmul(LIB, x, ql.qweight, ql.scales_and_zeros)
    for i in range(7):
        assert torch.equal(n4.int4_matmul(LIB, x[i : i + 1], ql.qweight, ql.scales_and_zeros), y7[i : i + 1])
    y3 = n4.int4_matmul(LIB, x[2:5], ql.qweight, ql.scales_and_zeros)  # odd M: pair tile + single tile
    assert torch.equal(y3, y7[2:5])
    big = torch.cat([x, torch.randn(20, k)])  # larger M, other rows around
    assert torch.equal(n4.int4_matmul(LIB, big, ql.qweight, ql.scales_and_zeros)[:7], y7)


@needs_lib
def test_quantlinear_uses_kernel_and_falls_back_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    ql = layer(96, 256, 3)
    x = torch.randn(2, 3, 256)
    assert ql.native_int4() is not None
    y = ql(x)
    xm = x.reshape(6, 256)
    expect = n4.int4_matmul(LIB, xm, ql.qweight, ql.scales_and_zeros)[:, :96] + ql.bias
    assert torch.equal(y.reshape(6, 96), expect)
    assert rel_err(y, ql.reference_forward(x)) < 1e-4
    monkeypatch.setenv("MOEMESH_INT4_NATIVE", "0")
    assert ql.native_int4() is None
    y_torch = ql(x)  # torch's bf16 kernel: bf16 activations and output
    expect_torch = torch._weight_int4pack_mm_for_cpu(xm.bfloat16(), ql.qweight, 32, ql.scales_and_zeros)
    assert torch.equal(y_torch.reshape(6, 96), torch.add(expect_torch[:, :96], ql.bias))


def test_unsupported_layers_use_torch() -> None:
    assert not n4.supports((64, True), 64, 256)  # group 64: torch kernel
    assert n4.supports((32, True), 32, 256)  # torch's AVX2 packing: read by every build since the AVX2 port
    assert not n4.supports((32, False), 32, 256)  # torch's plain (no-SIMD) packing: torch kernel
    assert not n4.supports(None, 32, 256)
    ql = QuantLinear.from_float(torch.randn(64, 256), None, "int4", 64)
    assert ql.native_int4() is None
    x = torch.randn(3, 256)
    expect = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), ql.qweight, 64, ql.scales_and_zeros).float()
    assert torch.equal(ql(x), expect)


def test_disabled_env_gives_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEMESH_INT4_NATIVE", "0")
    assert n4.load_native() is None


def test_no_compiler_gives_no_library(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A failed build is a clean None (torch kernel), not an error."""
    monkeypatch.setenv("MOEMESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    n4._load.cache_clear()
    try:
        assert n4.load_native() is None
    finally:
        n4._load.cache_clear()


@needs_lib
def test_bad_buffers_are_rejected() -> None:
    ql = layer(64, 128, 5)
    with pytest.raises(ValueError, match="int4_matmul"):
        n4.int4_matmul(LIB, torch.randn(1, 128), ql.qweight, ql.scales_and_zeros.float())
    with pytest.raises(ValueError, match="int4_matmul"):
        n4.int4_matmul(LIB, torch.randn(1, 256), ql.qweight, ql.scales_and_zeros)
