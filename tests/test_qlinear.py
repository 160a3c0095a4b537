"""QuantLinear accuracy, the int4 kernel formula, shape fallbacks and model-wide swapping.

Error figures in comments were measured with torch 2.13 CPU (AVX-512) and these seeds:
relative error = ||y - y_ref|| / ||y_ref|| over all outputs, random N(0, 1) weights and inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.quant.qlinear import NEVER, QuantLinear, quantize_model_linears
from moemesh.quant.qlinear_rows import from_float_rows

BF16_U = 2.0**-8  # relative rounding bound of bf16 (8 significant bits, round to nearest)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def paths(layer: QuantLinear) -> list[int]:
    """dequant_min_m values that force the kernel path and the dequantize-once path."""
    return [NEVER, 0] if layer.mode in ("int8", "int4") else [layer.dequant_min_m]


# (mode, group, bound vs fp32 F.linear). Measured on K in {256, 512, 576}: bf16 0.28-0.29%,
# int8 0.74-0.80%, int4 g32 7.8%, g64 8.9-9.0%, g128 9.8-10.2%.
ACCURACY = [("fp32", 32, 1e-6), ("bf16", 32, 0.005), ("int8", 32, 0.01),
            ("int4", 32, 0.09), ("int4", 64, 0.105), ("int4", 128, 0.115)]


@pytest.mark.parametrize("mode,group,bound", ACCURACY)
@pytest.mark.parametrize("k,n", [(256, 128), (512, 96)])
def test_accuracy_vs_fp32(mode: str, group: int, bound: float, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g)  # [N, K]
    b = torch.randn(n, generator=g)
    x = torch.randn(3, 7, k, generator=g)  # 21 rows: kernel path unless forced
    layer = QuantLinear.from_float(w, b, mode, group)
    assert layer.mode == mode and layer.fallback is None
    ref = F.linear(x, w, b)
    for min_m in paths(layer):
        layer.dequant_min_m = min_m
        y = layer(x)
        assert y.shape == (3, 7, n) and y.dtype == torch.float32
        assert rel_err(y, ref) < bound
        # vs the layer's own reference: only bf16 activations/outputs (and, on the dequant
        # path, bf16 weights) differ; measured 0.23-0.29%
        assert rel_err(y, layer.reference_forward(x)) < 0.005


def test_int4_dequantized_weight_is_what_the_kernel_computes() -> None:
    """Kernel decode with fp32 identity input equals (q - 8) * s + z bit for bit."""
    w = torch.randn(80, 128, generator=torch.Generator().manual_seed(1))
    layer = QuantLinear.from_float(w, None, "int4", 32)
    eye = torch.eye(128)
    sz = layer.scales_and_zeros.float()  # [K/g, N_pad, 2]
    kernel_w = torch._weight_int4pack_mm_for_cpu(eye, layer.qweight, 32, sz).t()[:80]  # [N, K]
    assert torch.equal(kernel_w, layer.dequantized_weight())


def test_int4_kernel_formula_and_dtypes() -> None:
    """Pins the facts the layer relies on: W = (q - 8) * scale + zero; scales dtype == x dtype."""
    n, k, g = 16, 64, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scale, zero = torch.rand(k // g, n) + 0.5, torch.randn(k // g, n)
    sz = torch.stack([scale, zero], -1)  # [K/g, N, 2]
    w = torch._weight_int4pack_mm_for_cpu(torch.eye(k), packed, g, sz).t()  # [N, K]
    expect = (q.float() - 8) * scale.t().repeat_interleave(g, 1) + zero.t().repeat_interleave(g, 1)
    torch.testing.assert_close(w, expect, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError):  # bf16 x with fp32 scales is refused
        torch._weight_int4pack_mm_for_cpu(torch.eye(k).bfloat16(), packed, g, sz)


@pytest.mark.parametrize("style", ["q4_0", "q4_1"])
@pytest.mark.parametrize("n", [64, 40])  # 40: not a multiple of 16, padded
def test_from_int4_groups(style: str, n: int) -> None:
    k, g = 256, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.05 + 0.001  # [N, K/g]
    minv = -8 * scale if style == "q4_0" else torch.randn(n, k // g, generator=gen) * 0.2
    exact = q.float() * scale.repeat_interleave(g, 1) + minv.repeat_interleave(g, 1)  # [N, K]
    bias = torch.randn(n, generator=gen)
    layer = QuantLinear.from_int4_groups(q, scale, minv, bias, g)
    assert layer.mode == "int4" and layer.group_size == g

    # documented bound: |dw| <= 2^-8 (|q - 8| |scale| + |z|), z = minv + 8 scale, + fp32 slack
    z = (minv + 8 * scale).repeat_interleave(g, 1)
    bound = BF16_U * ((q.float() - 8).abs() * scale.repeat_interleave(g, 1) + z.abs())
    dw = (layer.dequantized_weight() - exact).abs()
    assert (dw <= bound * (1 + 1e-5) + 1e-6 * exact.abs() + 1e-9).all()
    if style == "q4_0":  # zero is exactly 0: stored symmetric, only the scale is rounded
        assert layer.symmetric and tuple(layer.scales.shape) == (k // g, layer.qweight.shape[0])
    else:
        assert not layer.symmetric

    x = torch.randn(5, k, generator=gen)
    for min_m in paths(layer):
        layer.dequant_min_m = min_m
        y = layer(x)
        assert y.shape == (5, n)
        assert rel_err(y, layer.reference_forward(x)) < 0.005  # measured ~0.25%
        assert rel_err(y, F.linear(x, exact, bias)) < 0.01


def test_from_int4_groups_unsupported_group_falls_back_to_bf16() -> None:
    n, k, g = 32, 64, 16  # the CPU kernel has no group 16
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale, minv = torch.rand(n, k // g, generator=gen), torch.randn(n, k // g, generator=gen)
    layer = QuantLinear.from_int4_groups(q, scale, minv, None, g)
    exact = q.float() * scale.repeat_interleave(g, 1) + minv.repeat_interleave(g, 1)
    assert layer.mode == "bf16" and layer.fallback
    torch.testing.assert_close(layer.dequantized_weight(), exact, rtol=BF16_U, atol=0)
    assert layer(torch.randn(3, k)).shape == (3, n)


# (K, N, requested mode, group) -> expected stored mode and group
ODD_SHAPES = [
    (100, 40, "int4", 32, "bf16", 0),  # K has no group and is not a multiple of 16
    (100, 40, "int8", 32, "bf16", 0),
    (48, 24, "int4", 32, "int8", 0),  # K % 32 != 0 but K % 16 == 0
    (96, 72, "int4", 64, "int4", 32),  # 96 % 64 != 0: smaller group; N=72 padded to 80
    (576, 8, "int4", 128, "int4", 64),
    (64, 1, "int4", 32, "int4", 32),  # one output row, padded to 16
    (64, 1, "int8", 32, "int8", 0),
    (30, 5, "bf16", 32, "bf16", 0),
    (30, 5, "fp32", 32, "fp32", 0),
]


@pytest.mark.parametrize("k,n,mode,group,stored,stored_group", ODD_SHAPES)
def test_odd_shapes_fall_back(k: int, n: int, mode: str, group: int, stored: str, stored_group: int) -> None:
    gen = torch.Generator().manual_seed(k * n)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    layer = QuantLinear.from_float(w, b, mode, group)
    assert layer.mode == stored and layer.requested_mode == mode
    assert (layer.fallback is not None) == (stored != mode or (stored_group not in (0, group)))
    if stored == "int4":
        assert layer.group_size == stored_group
    x = torch.randn(9, k, generator=gen)
    bound = {"fp32": 1e-6, "bf16": 0.01, "int8": 0.02, "int4": 0.12}[stored]
    for min_m in paths(layer):
        layer.dequant_min_m = min_m
        y = layer(x)
        assert y.shape == (9, n)
        assert rel_err(y, F.linear(x, w, b)) < bound
        assert rel_err(y, layer.reference_forward(x)) < max(bound, 0.01)


@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4"])
def test_input_ranks_bias_and_empty(mode: str) -> None:
    k, n = 64, 48
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen) * 10
    with_bias = QuantLinear.from_float(w, b, mode)
    no_bias = QuantLinear.from_float(w, None, mode)
    for shape in [(k,), (4, k), (2, 3, k)]:
        x = torch.randn(*shape, generator=gen)
        y = with_bias(x)
        assert y.shape == (*shape[:-1], n)
        torch.testing.assert_close(y, no_bias(x) + b, rtol=1e-5, atol=1e-4)  # bias is exact fp32
        assert rel_err(y, with_bias.reference_forward(x)) < 0.005
    assert with_bias(torch.randn(0, k)).shape == (0, n)


def test_misaligned_bf16_input_is_safe() -> None:
    """The int8 kernel's aligned loads would crash on an offset bf16 view; forward copies it."""
    layer = QuantLinear.from_float(torch.randn(32, 64), None, "int8")
    x = torch.randn(5 * 64 + 1).bfloat16()[1:].view(5, 64)  # data_ptr is 2 bytes off
    torch.testing.assert_close(layer(x), layer(x.float()), rtol=0, atol=0)


def test_nbytes() -> None:
    k, n = 256, 64
    w = torch.randn(n, k)
    assert QuantLinear.from_float(w, None, "fp32").nbytes() == 4 * n * k
    assert QuantLinear.from_float(w, None, "bf16").nbytes() == 2 * n * k
    assert QuantLinear.from_float(w, None, "int8").nbytes() == n * k + 4 * n
    assert QuantLinear.from_float(w, None, "int4", 32).nbytes() == n * k // 2 + (k // 32) * n * 2 * 2
    assert QuantLinear.from_float(w, torch.zeros(n), "int8").nbytes() == n * k + 8 * n


def test_quantize_model_linears() -> None:
    torch.manual_seed(6)
    model = torch.nn.ModuleDict({
        "block": torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64)),
        "router": torch.nn.Linear(64, 8, bias=False),
        "lm_head": torch.nn.Linear(64, 100),
    })
    x = torch.randn(3, 64)
    before = model["block"](x)
    replaced = quantize_model_linears(model, "int8", exclude=["lm_head", "rout*"])
    assert replaced == ["block.0", "block.2"]
    assert isinstance(model["block"][0], QuantLinear) and isinstance(model["block"][2], QuantLinear)
    assert type(model["router"]) is torch.nn.Linear and type(model["lm_head"]) is torch.nn.Linear
    assert rel_err(model["block"](x), before) < 0.02


@pytest.mark.parametrize("mode", ["int4", "int8", "bf16"])
def test_rows_do_not_depend_on_batch_size(mode):
    """Batched == alone in the engine needs each output row to be independent of M."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(96, 64), None, mode)
    x = torch.randn(300, 64)
    full = layer(x)
    for i in (0, 5, 127, 128, 299):
        assert torch.equal(full[i], layer(x[i : i + 1])[0])


@pytest.mark.parametrize("mode", ["int4", "int8", "bf16"])
def test_from_float_rows_equals_from_float(mode):
    torch.manual_seed(1)
    w = torch.randn(300, 64)
    whole = QuantLinear.from_float(w, None, mode)
    chunked = from_float_rows(w.to(torch.bfloat16).float(), mode, rows=64)
    ref = QuantLinear.from_float(w.to(torch.bfloat16).float(), None, mode)
    x = torch.randn(5, 64)
    assert torch.equal(chunked(x), ref(x)) and chunked.out_features == whole.out_features
    assert torch.equal(chunked.dequantized_weight(), ref.dequantized_weight())
