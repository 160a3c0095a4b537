"""WeightSource: where the builder gets tensors by HF name (safetensors dir, GGUF, store)."""
from __future__ import annotations

from typing import Protocol

import torch

from ..quant.int4_trunk import Int4Groups, dequantize, groups


class WeightSource(Protocol):
    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor in HF orientation, in its stored float dtype (dequantized if needed)."""

    def int4_groups(self, name: str) -> Int4Groups | None:
        """Exact 4-bit groups (w = q * scale + min, 32 columns a group) when stored that way."""


class SafetensorsSource:
    """Adapts a SafetensorsCheckpoint: float tensors, and an expert store's int4 trunk linears
    (NAME.q4 / .q4_scale / .q4_zero, weights/int4_trunk.py) as exact 4-bit groups."""

    def __init__(self, ckpt) -> None:
        self.ckpt = ckpt

    def has(self, name: str) -> bool:
        return self.ckpt.has(name) or self.ckpt.has(name + ".q4")

    def get(self, name: str) -> torch.Tensor:
        if not self.ckpt.has(name) and self.ckpt.has(name + ".q4"):
            return dequantize(*self.int4_parts(name))
        return self.ckpt.get(name)

    def int4_groups(self, name: str) -> Int4Groups | None:
        if not self.ckpt.has(name + ".q4"):
            return None
        return groups(*self.int4_parts(name))

    def int4_parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(packed uint8 [N, K/2], scale, zero bf16 [N, K/32]) as mmap views, or None."""
        if not self.ckpt.has(name + ".q4"):
            return None
        return tuple(self.ckpt.get(name + sfx) for sfx in (".q4", ".q4_scale", ".q4_zero"))  # type: ignore[return-value]
