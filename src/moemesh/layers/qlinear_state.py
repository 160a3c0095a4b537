"""Serialize a QuantLinear to flat tensors and back without any conversion work.

The expert store writes these tensors as they are; loading an expert is then a read into an
aligned buffer plus tensor views over it (no quantizing, packing or copying at load time).
"""
from __future__ import annotations

from typing import Any

import torch

from .qlinear import NEVER, QuantLinear

BUFFERS = {"int4": ("qweight", "scales_and_zeros"), "int8": ("qweight", "scales"), "bf16": ("weight",), "fp32": ("weight",)}


def export_state(layer: QuantLinear) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors): meta is JSON-able; tensors are the buffers the kernel reads."""
    if layer.bias is not None:
        raise ValueError("export_state: layers with a bias are not supported by the expert store")
    meta = {
        "mode": layer.mode, "in_features": layer.in_features, "out_features": layer.out_features,
        "group_size": layer.group_size,
        "int4_layout": list(layer._int4_layout) if layer._int4_layout else None,
    }
    return meta, {name: getattr(layer, name).contiguous() for name in BUFFERS[layer.mode]}


def from_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantLinear:
    """Inverse of export_state; the tensors are used as given (views are fine)."""
    mode = meta["mode"]
    layer = QuantLinear(meta["in_features"], meta["out_features"], mode, None)
    layer.group_size = meta["group_size"]
    layer._int4_layout = tuple(meta["int4_layout"]) if meta.get("int4_layout") else None
    if mode == "int4" and layer._int4_layout is None:
        layer.dequant_min_m = NEVER  # packing layout unknown: only the kernel can decode it
    for name in BUFFERS[mode]:
        layer.register_buffer(name, tensors[name])
    if mode == "int8":
        layer.register_buffer("_ones", torch.ones(layer.out_features, dtype=torch.bfloat16), persistent=False)
    return layer
