"""The ExpertProvider seam: the model never knows where an expert's weights live.

Resident (all in RAM) is here; lazy (disk + RAM-budgeted cache) and remote (mesh peers) plug in
behind the same ``run`` call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..layers.mlp import GatedMLP
from ..layers.moe import mix_grouped, mix_reference


class ExpertProvider(ABC):
    """Computes sum_a weights[t, a] * expert_{ids[t, a]}(x[t]) for one MoE layer.

    Invariant: the result equals ``mix_reference`` over the same expert weights (up to fp
    summation order); every expert of a layer is read at most once per call.
    """

    @abstractmethod
    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, D], ids: [T, A] int64, weights: [T, A] fp32 -> [T, D]."""

    def stats(self) -> dict:
        return {}


class ResidentExperts(ExpertProvider):
    """Every expert of every MoE layer held in memory (in whatever QuantLinear format)."""

    def __init__(self, experts: dict[int, list[GatedMLP]], reference: bool = False) -> None:
        self.experts = experts  # layer -> [E] experts
        self.reference = reference  # use the per-token loop (tests, debugging)

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        mix = mix_reference if self.reference else mix_grouped
        return mix(x, ids, weights, self.experts[layer].__getitem__)

    def nbytes(self) -> int:
        return sum(e.nbytes() for layer in self.experts.values() for e in layer)
