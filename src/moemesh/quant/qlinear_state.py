"""Serialize a QuantLinear to flat tensors and back without any conversion work.

The expert store writes these tensors as they are; loading an expert is then a read into an
aligned buffer plus tensor views over it (no quantizing, packing or copying at load time).
"""
from __future__ import annotations

from typing import Any

import torch

from .blocks import BlockLinear
from .qlinear import NEVER, QuantLinear

BUFFERS = {"int4": ("qweight", "scales_and_zeros"), "int8": ("qweight", "scales"), "bf16": ("weight",), "fp32": ("weight",)}
SYMMETRIC_INT4 = ("qweight", "scales")  # int4 with zero 0 (meta "symmetric": true)


def buffer_names(meta: dict[str, Any]) -> tuple[str, ...]:
    """The tensors a layer of this meta is made of."""
    if meta["mode"] == "block":
        return ("raw",)
    return SYMMETRIC_INT4 if meta["mode"] == "int4" and meta.get("symmetric") else BUFFERS[meta["mode"]]


def export_state(layer: QuantLinear | BlockLinear) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors): meta is JSON-able; tensors are the buffers the kernel reads (a BlockLinear:
    its raw block rows as the file holds them, meta mode "block" with its qtype)."""
    if isinstance(layer, BlockLinear):
        meta: dict[str, Any] = {"mode": "block", "qtype": layer.qtype, "in_features": layer.in_features,
                                "out_features": layer.out_features}
        tensors = {"raw": layer.raw.contiguous()}
        if layer.bias is not None:
            meta["bias"] = True
            tensors["bias"] = layer.bias.float().contiguous()
        return meta, tensors
    meta = {
        "mode": layer.mode, "in_features": layer.in_features, "out_features": layer.out_features,
        "group_size": layer.group_size,
        "int4_layout": list(layer._int4_layout) if layer._int4_layout else None,
    }
    if layer.symmetric:  # the key is only present then, so older metas read the same
        meta["symmetric"] = True
    tensors = {name: getattr(layer, name).contiguous() for name in buffer_names(meta)}
    if layer.scale_blocks:  # a runtime layout (QuantLinear.use_block_scales): stored in torch's
        tensors["scales" if layer.symmetric else "scales_and_zeros"] = layer.torch_int4_scales()
    if layer.bias is not None:  # fp32 [O]; the key is only present then, so older metas read the same
        meta["bias"] = True
        tensors["bias"] = layer.bias.float().contiguous()
    return meta, tensors


def from_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantLinear | BlockLinear:
    """Inverse of export_state; the tensors are used as given (views are fine)."""
    mode = meta["mode"]
    if mode == "block":
        return BlockLinear(meta["qtype"], tensors["raw"], meta["in_features"], tensors["bias"] if meta.get("bias") else None)
    layer = QuantLinear(meta["in_features"], meta["out_features"], mode, None)
    if meta.get("bias"):
        layer.register_buffer("bias", tensors["bias"])
    layer.group_size = meta["group_size"]
    layer._int4_layout = tuple(meta["int4_layout"]) if meta.get("int4_layout") else None
    layer.symmetric = bool(meta.get("symmetric"))
    if mode == "int4" and layer._int4_layout is None:
        layer.dequant_min_m = NEVER  # packing layout unknown: only the kernel can decode it
    for name in buffer_names(meta):
        layer.register_buffer(name, tensors[name])
    if mode == "int8":
        layer.register_buffer("_ones", torch.ones(layer.out_features, dtype=torch.bfloat16), persistent=False)
    return layer
