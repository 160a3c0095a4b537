"""The ExpertProvider seam: the model never knows where an expert's weights live.

Resident (all in RAM) is here; lazy (disk + RAM-budgeted cache) and remote (mesh peers) plug in
behind the same ``run`` call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..layers import int4_native
from ..layers.int4_ops import expert_table
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
        self._tables: dict[int, tuple | None] = {}  # layer -> (pointer table, moe_decode_table's shape args) or None

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and not self.reference:
            table = self._decode_table(layer)
            if table is not None and len(set(ids[0].tolist())) == ids.shape[1]:
                # one C call from the router's picks (sort by id, pointer gather, experts, sum in order):
                # the bits of mix_one_token without its ~0.12 ms of Python per layer
                return int4_native.moe_decode_table(table[0], x, ids, weights, *table[1:])
        mix = mix_reference if self.reference else mix_grouped
        return mix(x, ids, weights, self.experts[layer].__getitem__)

    def _decode_table(self, layer: int) -> tuple | None:
        """(kernel library, pointer table, inter, gate_up N_pad, down N_pad, fmt) for a layer whose
        experts all run fused (layers/int4_ops.expert_table), else None; built on first use."""
        if layer not in self._tables:
            experts = self.experts[layer]  # a list by expert id, or (mesh shards) a dict of the held ones
            table = expert_table(experts) if isinstance(experts, list) else None
            lib = int4_native.load_native() if table is not None else None  # (expert_table checked fusability)
            self._tables[layer] = None if lib is None else (
                lib, table, experts[0].down.in_features, experts[0].gate_up.qweight.shape[0],
                experts[0].down.qweight.shape[0], experts[0].gate_up.kernel_fmt())
        return self._tables[layer]

    def forget_kernel_tables(self) -> None:
        """Drop the pointer tables: after the experts' buffers moved or changed layout."""
        self._tables.clear()

    def nbytes(self) -> int:
        return sum(e.nbytes() for layer in self.experts.values() for e in layer)
