"""Adapts a GGUF checkpoint (HF-named tensors) to the WeightSource protocol."""
from __future__ import annotations

import torch

from .gguf_reader import GGUFCheckpoint
from .source import Int4Groups


class GGUFSource:
    def __init__(self, ckpt: GGUFCheckpoint) -> None:
        self.ckpt = ckpt

    def has(self, name: str) -> bool:
        return name in self.ckpt.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.tensors[name].dequantize()

    def int4_groups(self, name: str) -> Int4Groups | None:
        return self.ckpt.tensors[name].int4_groups()
