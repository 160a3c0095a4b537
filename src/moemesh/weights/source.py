"""WeightSource: where the builder gets tensors by HF name (safetensors dir, GGUF, store)."""
from __future__ import annotations

from typing import Protocol

import torch

Int4Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q uint8 [O, I], scale [O, I/g], min [O, I/g]


class WeightSource(Protocol):
    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor in HF orientation, in its stored float dtype (dequantized if needed)."""

    def int4_groups(self, name: str) -> Int4Groups | None:
        """Exact 4-bit groups (w = q * scale + min, 32 columns a group) when stored that way."""


class SafetensorsSource:
    """Adapts a SafetensorsCheckpoint (plain float tensors, no native int4)."""

    def __init__(self, ckpt) -> None:
        self.ckpt = ckpt

    def has(self, name: str) -> bool:
        return self.ckpt.has(name)

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name)

    def int4_groups(self, name: str) -> Int4Groups | None:
        return None
