"""One QuantLinear from row chunks built separately (vocab-sized tables: never one fp32 or int32
copy of the whole table). Quantization is per row and chunks are multiples of the int4 packing
block (64 rows), so the result equals building the whole weight at once."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .qlinear import QuantLinear

ROWS = 4096  # a multiple of the int4 packing block (64)


def concat_rows(parts: list[QuantLinear], mode: str) -> QuantLinear:
    """Chunks of one weight (same mode, in_features, group; padding rows only in the last) -> one layer."""
    first = parts[0]
    n = sum(p.out_features for p in parts)
    layer = QuantLinear(first.in_features, n, first.mode, None)
    layer.requested_mode, layer.fallback, layer.group_size = mode, first.fallback, first.group_size
    layer._int4_layout, layer.dequant_min_m = first._int4_layout, first.dequant_min_m
    if first.mode == "int4":
        layer.register_buffer("qweight", torch.cat([p.qweight for p in parts]))
        if all(p.symmetric for p in parts):
            layer.symmetric = True
            layer.register_buffer("scales", torch.cat([p.scales for p in parts], dim=1))
        else:  # a chunk whose zeros all happen to be 0 is stored symmetric: give it its (scale, 0) pairs back
            layer.register_buffer("scales_and_zeros", torch.cat([p.torch_scales_and_zeros() for p in parts], dim=1))
    elif first.mode == "int8":
        layer.register_buffer("qweight", torch.cat([p.qweight for p in parts]))
        layer.register_buffer("scales", torch.cat([p.scales for p in parts]))
        layer.register_buffer("_ones", torch.ones(n, dtype=torch.bfloat16), persistent=False)
    else:
        layer.register_buffer("weight", torch.cat([p.weight for p in parts]))
    return layer


def from_row_chunks(n: int, build: Callable[[int, int], QuantLinear], mode: str, rows: int = ROWS) -> QuantLinear:
    """build(begin, end) makes the layer of rows [begin, end); n rows in all."""
    if n <= rows:
        return build(0, n)
    return concat_rows([build(i, min(n, i + rows)) for i in range(0, n, rows)], mode)


def from_float_rows(weight: torch.Tensor, mode: str, group_size: int = 32, rows: int = ROWS) -> QuantLinear:
    """QuantLinear.from_float (no bias) over chunks of ``rows`` rows of a [N, K] weight in any float
    dtype, so a vocab-sized table is never held whole in fp32 (151936 x 2048 would be 1.2 GB).
    Quantization is per row, and ``rows`` is a multiple of the int4 packing block (64), so the
    result equals from_float's."""
    return from_row_chunks(weight.shape[0], lambda a, b: QuantLinear.from_float(weight[a:b].float(), None, mode, group_size), mode, rows)
