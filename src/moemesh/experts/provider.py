"""ResidentExperts: every expert of every MoE layer held in RAM (in whatever QuantLinear format).

Lazy (disk + RAM-budgeted cache, experts/lazy.py) and remote (mesh peers, mesh/shards/remote_experts.py)
providers plug in behind the same ``run`` call (the contract: layers/moe.ExpertProvider).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers.mlp import GatedMLP, fused_table
from ..quant import int4_experts, int4_ops  # noqa: F401  (int4_ops registers moemesh::moe_decode)
from .mixing import Group, GroupedProvider, batchable, block_mix, expert_rows, group_by_expert, mix_reference


@dataclass(frozen=True)
class TableDecode:
    """A layer's resident int4 SwiGLU experts as one graph op: ``moemesh::moe_decode`` over the layer's
    pointer table (mlp.fused_table), the C call ``ResidentExperts.run`` makes for one decode token,
    so a compiled graph gets the eager MoE layer's bits. x [1, D], ids int64 [1, A], weights [1, A] -> [1, D]."""

    table: torch.Tensor  # int64 [E, 4]
    inter: int
    gu_npad: int
    dn_npad: int
    fmt: int

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.ops.moemesh.moe_decode(x, ids, weights, self.table, self.inter, self.gu_npad, self.dn_npad, self.fmt)


class ResidentExperts(GroupedProvider):
    """``experts``: layer -> a list by expert id, or (mesh shards) a dict of the held experts."""

    def __init__(self, experts: dict[int, list[GatedMLP] | dict[int, torch.nn.Module]], reference: bool = False) -> None:
        self.experts = experts
        self.reference = reference  # use the per-token loop (tests, debugging)
        self._tables: dict[int, tuple | None] = {}  # layer -> (pointer table, moe_decode_table's shape args) or None

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            rows: int | None = None) -> torch.Tensor:
        if self.reference:
            return mix_reference(x, ids, weights, self.experts[layer].__getitem__)
        if x.shape[0] == 1:
            table = self._decode_table(layer)
            if table is not None and len(set(ids[0].tolist())) == ids.shape[1]:
                # one C call from the router's picks (sort by id, pointer gather, experts, sum in order):
                # the grouped loop's bits without its ~0.12 ms of Python per layer
                return int4_experts.moe_decode_table(table[0], x, ids, weights, *table[1:])
            held = self.experts[layer]
            if table is None and isinstance(held, list) and isinstance(held[0], GatedMLP) and held[0].block_act():
                groups = group_by_expert(ids)  # block formats: one call, mixed in C
                out = block_mix([held[e] for e, _, _ in groups], groups, x, weights.reshape(-1))
                if out is not None:
                    return out
        elif batchable(x, ids, rows):
            table = self._decode_table(layer)
            if table is not None:
                # a batched decode step (or a short prompt chunk) in one C call: the grouped loop's bits
                # without its per-expert Python (two kernel calls, a silu, an index_add per expert)
                return int4_experts.moe_batch_table(table[0], x, ids, weights, *table[1:])
        return super().run(layer, x, ids, weights, rows)

    def weighted_outputs(self, layer: int, x: torch.Tensor, groups: list[Group], flat_w: torch.Tensor, *,
                         rows: int | None = None) -> list[torch.Tensor]:
        held = self.experts[layer]
        return expert_rows([held[e] for e, _, _ in groups], groups, x, flat_w, rows)

    def holds(self, layer: int, expert: int) -> bool:
        held = self.experts.get(layer)
        return held is not None and (expert in held if isinstance(held, dict) else 0 <= expert < len(held))

    def _decode_table(self, layer: int) -> tuple | None:
        """(kernel library, pointer table, inter, gate_up N_pad, down N_pad, fmt, epilogue) for a layer whose
        experts all run fused (mlp.fused_table), else None; built on first use."""
        if layer not in self._tables:
            experts = self.experts[layer]
            self._tables[layer] = fused_table(experts) if isinstance(experts, list) else None
        return self._tables[layer]

    def decode_op(self, layer: int) -> TableDecode | str:
        """The one-call decode as a graph op when every expert of ``layer`` is a fusable int4 SwiGLU
        (and not ``reference``); otherwise why not (the grouped loop has no graph form)."""
        if self.reference:
            return "resident experts in reference mode (the per-token loop) have no graph form"
        table = self._decode_table(layer)
        if table is None:
            return "resident experts that are not int4 SwiGLUs the fused C kernel reads have no graph form"
        if table[6] is not None:
            return "resident int4 experts with biases or another act than silu have no graph op (they run eagerly)"
        return TableDecode(*table[1:6])

    def forget_kernel_tables(self) -> None:
        """Drop the pointer tables: after the experts' buffers moved or changed layout."""
        self._tables.clear()

    def nbytes(self) -> int:
        return sum(e.nbytes() for layer in self.experts.values() for e in (layer.values() if isinstance(layer, dict) else layer))
