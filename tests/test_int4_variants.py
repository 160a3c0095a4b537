"""The int4 kernel's three builds (quant/int4_kernel.h: plain C, AVX2, AVX-512) give the same bits.

The plain-C build is the reference: the same integer dots and fp32 operations in the same order. Every
SIMD build this CPU runs is compared with it bit for bit on the matmul (M = 1, 3, 40; bf16 input), the
fused experts, the one-call mix and the pointer-table decode, with full blocks and 16/32/48-row tail
blocks, symmetric and asymmetric scales, torch's and the block-major scale layout, and both of torch's
weight packings (64-row blocks from an AVX-512 machine, 32-row from an AVX2 one). Builds this CPU lacks
are skipped, naming what it has. Every test runs at both activation precisions (MOEMESH_INT4_ACT 16:
two int8 planes, 8: one), each SIMD build against the scalar build of the same precision.
"""
from __future__ import annotations

import pytest
import torch

from moemesh.layers.mlp import GatedMLP
from moemesh.quant import int4_experts as n4e
from moemesh.quant import int4_native as n4
from moemesh.quant.int4_pack import pack_int4, torch_layout, unpack_int4
from moemesh.quant.qlinear import QuantLinear
from moemesh.quant.qlinear_state import export_state, from_state

needs_ref = pytest.mark.skipif(n4.load_variant("scalar") is None, reason="no C compiler (the C int4 kernel is not built)")
PACKINGS = [(64, True), (32, True)]  # torch's AVX-512 and AVX2 packings


@pytest.fixture(autouse=True, params=[16, 8], ids=["act16", "act8"])
def act(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The activation precision of the test: the builds compared, and load_native's (reference_forward)."""
    monkeypatch.setenv(n4.ACT_ENV, str(request.param))
    return request.param


def scalar_ref():
    """The scalar build at the test's activation precision (the reference of the SIMD builds)."""
    return n4.load_variant("scalar", n4.activation_bits() == 8)


def simd(isa: str):
    lib = n4.load_variant(isa, n4.activation_bits() == 8)
    if lib is None:
        pytest.skip(f"this CPU does not run the {isa} build (it runs: {', '.join(n4.cpu_isas())})")
    return lib


def repacked(layer: QuantLinear, packing: tuple[int, bool]) -> QuantLinear:
    """The same weight as packed on a machine whose torch writes ``packing`` (a store from there)."""
    meta, tensors = export_state(layer)
    n_pad, k = layer.qweight.shape[0], layer.in_features
    q = unpack_int4(layer.qweight, n_pad, k, *layer._int4_layout)
    return from_state({**meta, "int4_layout": list(packing)}, {**tensors, "qweight": pack_int4(q, *packing)})


def linear(n: int, k: int, sym: bool, packing: tuple[int, bool], blocks: bool, seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    if sym:
        s = torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3
        lin = QuantLinear.from_int4_groups(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8), s, -8 * s, None)
    else:
        lin = QuantLinear.from_float(torch.randn(n, k, generator=g), None, "int4")
    lin = repacked(lin, packing)
    assert lin.native_int4() is not None or n4.load_native() is None
    if blocks:
        lin.use_block_scales()
    return lin


# rows: full 64-row blocks; 64 + a 16/32/48-row tail (a 32-row packing has no 32/48 tail: 96 = 3 blocks)
SHAPES = [(128, 256), (80, 96), (96, 64), (112, 128), (176, 64), (48, 32)]


@needs_ref
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("sym,blocks", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_bits_equal_the_scalar_build(isa: str, packing: tuple[int, bool], sym: bool, blocks: bool) -> None:
    lib = simd(isa)
    g = torch.Generator().manual_seed(5)
    for i, (n, k) in enumerate(SHAPES):
        lin = linear(n, k, sym, packing, blocks, i)
        fmt = lin.kernel_fmt()
        assert bool(fmt & n4.FMT_B32) == (packing == (32, True)) and bool(fmt & n4.FMT_BLOCKS) == blocks
        for m in (1, 3, 40):
            x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
            for xx in (x, x.bfloat16()):
                want = n4.int4_matmul(scalar_ref(), xx, lin.qweight, lin.int4_scales(), fmt)
                assert torch.equal(n4.int4_matmul(lib, xx, lin.qweight, lin.int4_scales(), fmt), want), (n, k, m, xx.dtype)


@needs_ref
@pytest.mark.parametrize("packing", PACKINGS)
def test_scalar_build_matches_the_reference_arithmetic(packing: tuple[int, bool]) -> None:
    """The plain-C build against the contract written in torch (exact integer dots, other fp32 order)."""
    g = torch.Generator().manual_seed(9)
    for i, (n, k) in enumerate(SHAPES):
        lin = linear(n, k, False, packing, False, 10 + i)
        x = torch.randn(3, k, generator=g)
        y = n4.int4_matmul(scalar_ref(), x, lin.qweight, lin.scales_and_zeros, lin.kernel_fmt())
        q = unpack_int4(lin.qweight, lin.qweight.shape[0], k, *packing)
        ref = n4.reference_int4_matmul(x, q, lin.scales_and_zeros, x8=n4.activation_bits() == 8)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_ref
def test_packings_give_the_same_bits() -> None:
    """A store packed on an AVX-512 machine and one packed here: same weight, same outputs, every build."""
    g = torch.Generator().manual_seed(2)
    for isa in n4.cpu_isas():
        lib = n4.load_variant(isa, n4.activation_bits() == 8)
        for n, k in SHAPES:
            a, b = (linear(n, k, False, p, False, n + k) for p in PACKINGS)
            x = torch.randn(3, k, generator=g)
            assert torch.equal(n4.int4_matmul(lib, x, a.qweight, a.int4_scales(), a.kernel_fmt()),
                               n4.int4_matmul(lib, x, b.qweight, b.int4_scales(), b.kernel_fmt()))
            assert torch.equal(a.dequantized_weight(), b.dequantized_weight())


def test_foreign_packing_falls_back_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C kernel off, a weight packed on the other kind of machine (which torch's kernel here
    cannot read) runs on its dequantized weight; the native packing still uses torch's kernel."""
    monkeypatch.setenv("MOEMESH_INT4_NATIVE", "0")
    native = QuantLinear.from_float(torch.randn(96, 64), None, "int4")
    other = next(p for p in PACKINGS if p != torch_layout())
    foreign = repacked(native, other)
    x = torch.randn(2, 64)
    expect = torch.nn.functional.linear(x.bfloat16(), native.dequantized_weight().bfloat16()).float()
    assert torch.equal(foreign(x), expect)
    torch_y = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), native.qweight, 32, native.scales_and_zeros).float()
    assert torch.equal(native(x), torch_y)


def experts(d: int, inter: int, sym: bool, packing: tuple[int, bool], blocks: bool, n: int,
            scale: float = 1.0) -> list[GatedMLP]:
    out = []
    for e in range(n):
        gu, dn = linear(2 * inter, d, sym, packing, blocks, 100 + e), linear(d, inter, sym, packing, blocks, 200 + e)
        if scale != 1.0:  # larger gate values: silu's clamp and the far ends of its exp
            for lin in (gu,):
                s = lin.int4_scales()
                s.copy_((s.float() * scale).bfloat16())
        out.append(GatedMLP(gu, dn))
    return out


@needs_ref
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("sym,blocks", [(False, False), (True, True)])
@pytest.mark.parametrize("d,inter", [(96, 160), (256, 96), (2048, 768)])
def test_fused_experts_mix_and_decode_bits_equal_the_scalar_build(isa: str, packing: tuple[int, bool], sym: bool,
                                                                   blocks: bool, d: int, inter: int) -> None:
    lib = simd(isa)
    mlps = experts(d, inter, sym, packing, blocks, 5)
    fmt = mlps[0].gate_up.kernel_fmt()
    ptrs = [[t.data_ptr() for t in (m.gate_up.qweight, m.gate_up.int4_scales(), m.down.qweight, m.down.int4_scales())]
            for m in mlps]
    gu_npad, dn_npad = mlps[0].gate_up.qweight.shape[0], mlps[0].down.qweight.shape[0]
    g = torch.Generator().manual_seed(d + inter)
    x, w = torch.randn(1, d, generator=g), torch.rand(5, generator=g)
    ffn = n4e.experts_ffn_ptrs(scalar_ref(), x, inter, ptrs, gu_npad, dn_npad, fmt)
    assert torch.equal(n4e.experts_ffn_ptrs(lib, x, inter, ptrs, gu_npad, dn_npad, fmt), ffn)
    mix = n4e.experts_mix_ptrs(scalar_ref(), x, inter, ptrs, w, gu_npad, dn_npad, fmt, d)
    assert torch.equal(n4e.experts_mix_ptrs(lib, x, inter, ptrs, w, gu_npad, dn_npad, fmt, d), mix)
    table = torch.tensor(ptrs, dtype=torch.int64)  # [E, 4]
    ids, weights = torch.tensor([[4, 0, 2]]), torch.rand(1, 3, generator=g)
    args = (table, inter, gu_npad, dn_npad, fmt)
    dec = n4e.moe_decode_table(scalar_ref(), x, ids, weights, *args)
    assert torch.equal(n4e.moe_decode_table(lib, x, ids, weights, *args), dec)
    ref = torch.cat([m.reference_forward(x) for m in mlps])  # unfused: two kernel calls and torch's silu
    assert ((ffn[:, :d] - ref).norm() / ref.norm()).item() < 1e-5  # silu ulps, requantized: measured <= 1.01e-6


@needs_ref
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_silu_far_ends_bits_equal_the_scalar_build(isa: str) -> None:
    """Gate values of several hundred: silu's clamp at +-88.4, exp(-g) near 2^+-127 (the AVX2 build makes
    2^n from exponent bits, AVX-512 uses scalef, plain C ldexpf)."""
    lib = simd(isa)
    mlps = experts(64, 32, False, torch_layout(), False, 3, scale=400.0)
    ptrs = [[t.data_ptr() for t in (m.gate_up.qweight, m.gate_up.int4_scales(), m.down.qweight, m.down.int4_scales())]
            for m in mlps]
    fmt, gu_npad, dn_npad = mlps[0].gate_up.kernel_fmt(), mlps[0].gate_up.qweight.shape[0], mlps[0].down.qweight.shape[0]
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 4
    gate = mlps[0].gate_up(x)[0, :32]
    assert gate.abs().max() > 100  # the clamp is reached
    y = n4e.experts_ffn_ptrs(scalar_ref(), x, 32, ptrs, gu_npad, dn_npad, fmt)
    assert torch.isfinite(y).all()
    assert torch.equal(n4e.experts_ffn_ptrs(lib, x, 32, ptrs, gu_npad, dn_npad, fmt), y)


def test_the_env_var_picks_a_build(monkeypatch: pytest.MonkeyPatch) -> None:
    best = n4.cpu_isas()[0]
    assert n4.cpu_isas()[-1] == "scalar"
    monkeypatch.setenv(n4.ISA_ENV, "scalar")
    lib = n4.load_native()
    assert lib is None or lib.i4_isa() == 0
    monkeypatch.delenv(n4.ISA_ENV)
    lib = n4.load_native()
    assert lib is None or lib.i4_isa() == n4.ISAS[best]
    missing = [isa for isa in n4.ISAS if isa not in n4.cpu_isas()]
    if missing:
        monkeypatch.setenv(n4.ISA_ENV, missing[0])
        with pytest.warns(RuntimeWarning, match="lacks it"):
            assert n4.load_native() is None
    monkeypatch.setenv(n4.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="expected one of"):
        n4.load_native()


def test_activation_bits_default_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 bits unless the variable says 8; a bad value warns."""
    monkeypatch.delenv(n4.ACT_ENV)
    assert n4.activation_bits() == 16
    for v in ("8", "16"):
        monkeypatch.setenv(n4.ACT_ENV, v)
        assert n4.activation_bits() == int(v)
        lib = n4.load_native()
        assert lib is None or lib.i4_x8() == (v == "8")
    monkeypatch.setenv(n4.ACT_ENV, "12")
    n4._activation_bits.cache_clear()  # (warned once per value and process)
    with pytest.warns(RuntimeWarning, match="expected 8 or 16"):
        assert n4.activation_bits() in (8, 16)
