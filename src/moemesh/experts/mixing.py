"""Mixing a layer's experts: the one home of "group rows by expert -> each expert over its rows ->
add the weighted rows in expert-id order", shared by every provider (resident, lazy, remote, and the
mesh's expert server), so they all give the same bits for the same experts.

Shape legend: T tokens, D hidden, A active experts per token, n rows routed to one expert.

``GroupedProvider.run`` is that loop; a provider only says how it gets each expert's weighted rows
(``weighted_outputs``: held in RAM, read through the cache, or computed by a peer). ``expert_rows``
is the shared per-expert computation, with one fused kernel call when one decode token goes through
several fusable int4 experts (each row the bits the expert gives alone). ``mix_reference`` is the
obvious per-token, per-slot loop kept beside it for tests; ``sum_in_order`` is the reference of the
C kernels' one-call mix (``quant.int4_experts.moe_decode_table``).
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch

from ..layers.mlp import GatedMLP, fused_table, run_fused
from ..layers.moe import ExpertProvider
from ..quant import blocks_ffn, int4_experts

Group = tuple[int, torch.Tensor, torch.Tensor]  # (expert, token_idx [n], slot_idx [n] into the flat [T*A] picks)
ExpertFn = Callable[[int], torch.nn.Module]


def group_by_expert(ids: torch.Tensor) -> list[Group]:
    """ids [T, A] -> [(expert, token_idx [n], slot_flat_idx [n])] sorted by expert id."""
    if ids.shape[0] == 1:  # a decode token (distinct picks): the same groups without the sort and count ops
        row = ids[0].tolist()
        if len(set(row)) == len(row):
            zero = torch.zeros(1, dtype=torch.int64)
            return [(e, zero, torch.tensor([j])) for j, e in sorted(enumerate(row), key=lambda p: p[1])]
    flat = ids.reshape(-1)  # [T*A]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat).tolist()
    groups, start, a = [], 0, ids.shape[1]
    for expert, count in enumerate(counts):
        if count:
            slots = order[start : start + count]
            groups.append((expert, slots // a, slots))
            start += count
    return groups


def accumulate(out: torch.Tensor, token_idx: torch.Tensor, y: torch.Tensor) -> None:
    """out[token_idx] += y. One decode token: a plain add (index_add_ opens an OpenMP region,
    ~30x slower at this size); the same float additions, so the result is identical."""
    if out.shape[0] == 1:
        out.add_(y)
    else:
        out.index_add_(0, token_idx, y)


def add_in_order(x: torch.Tensor, groups: list[Group], ys: list[torch.Tensor]) -> torch.Tensor:
    """sum over experts, in the groups' (expert-id) order, of each expert's weighted rows -> [T, D]."""
    out = torch.zeros_like(x)
    for (_, token_idx, _), y in zip(groups, ys):
        accumulate(out, token_idx, y)
    return out


def expert_rows(mlps: list[torch.nn.Module], groups: list[Group], x: torch.Tensor, flat_w: torch.Tensor,
                rows: int | None = None) -> list[torch.Tensor]:
    """Each expert's output on its tokens times its routing weights, [n, D] per expert. One decode
    token through several fusable int4 experts takes one fused kernel call (mlp.run_fused): each row
    is the bits the expert gives alone, so the result does not depend on how experts were grouped
    into calls (lazy == resident stays exact). ``rows``: each expert runs over its tokens of each
    block of ``rows`` consecutive tokens separately (the calls a chunked pass makes)."""
    if x.shape[0] == 1 and len(mlps) > 1 and all(isinstance(m, GatedMLP) and m.fused_int4() is not None for m in mlps):
        y = run_fused(mlps[0].fused_int4(), mlps, x)  # [n, D]
        return [y[j : j + 1] * flat_w[slots, None] for j, (_, _, slots) in enumerate(groups)]
    if x.shape[0] == 1 and len(mlps) > 1:
        y = block_rows(mlps, x)
        if y is not None:
            return [y[j : j + 1] * flat_w[slots, None] for j, (_, _, slots) in enumerate(groups)]
    return [per_block(m, x, token_idx, rows) * flat_w[slots, None] for m, (_, token_idx, slots) in zip(mlps, groups)]


def _block_call(mlps: list[torch.nn.Module]) -> tuple[list, tuple] | None:
    """(experts as (gate_up, down), activation args) when block-format experts (GatedMLP.block_act) of
    one shape and activation can share one blocks_ffn.experts_mix call, else None."""
    acts = [m.block_act() if isinstance(m, GatedMLP) else None for m in mlps]
    if acts[0] is None or any(a != acts[0] for a in acts):
        return None
    experts = [(m.gate_up, m.down) for m in mlps]
    return (experts, acts[0]) if blocks_ffn.fusable(experts) else None


def block_rows(mlps: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """One token through block-format experts in one C call (no mix): [n, D], row e the bits of
    mlps[e](x); None when they cannot share a call."""
    call = _block_call(mlps)
    return None if call is None else blocks_ffn.experts_mix(x, call[0], None, *call[1])


def block_mix(mlps: list[torch.nn.Module], groups: list[Group], x: torch.Tensor,
              flat_w: torch.Tensor) -> torch.Tensor | None:
    """One decode token's layer output [1, D] through block-format experts in one C call that also
    weights and sums them in the groups' order (each product rounded, then one add per expert:
    add_in_order's bits over expert_rows'); None when they cannot share a call."""
    if x.shape[0] != 1 or len(mlps) < 2:
        return None
    call = _block_call(mlps)
    if call is None:
        return None
    w = flat_w[torch.cat([slots for _, _, slots in groups])]  # [n], the groups' order
    return blocks_ffn.experts_mix(x, call[0], w, *call[1])


def per_block(mlp: torch.nn.Module, x: torch.Tensor, token_idx: torch.Tensor, rows: int | None) -> torch.Tensor:
    """mlp(x[token_idx]) [n, D], one call per block of ``rows`` consecutive tokens (token_idx ascending).
    Block-format experts take all their tokens in one call: their kernels give each row the same bits
    whatever the rows beside it (blocks_kernel.h), and fewer, taller calls run faster."""
    if rows is None or (isinstance(mlp, GatedMLP) and mlp.block_act() is not None):
        return mlp(x[token_idx])
    block = token_idx // rows  # [n]
    cuts = (torch.nonzero(block[1:] != block[:-1]).flatten() + 1).tolist()
    if not cuts:
        return mlp(x[token_idx])
    return torch.cat([mlp(x[part]) for part in torch.tensor_split(token_idx, cuts)])


class GroupedProvider(ExpertProvider):
    """An ExpertProvider that computes a layer as: group by expert -> ``weighted_outputs`` -> add in id order."""

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            rows: int | None = None) -> torch.Tensor:
        # x: [T, D], ids/weights: [T, A] -> [T, D]
        groups = group_by_expert(ids)
        flat_w = weights.reshape(-1)
        ys = self.weighted_outputs(layer, x, groups, flat_w) if rows is None else \
            self.weighted_outputs(layer, x, groups, flat_w, rows=rows)
        return add_in_order(x, groups, ys)

    @abstractmethod
    def weighted_outputs(self, layer: int, x: torch.Tensor, groups: list[Group], flat_w: torch.Tensor, *,
                         rows: int | None = None) -> list[torch.Tensor]:
        """For each group (expert, token_idx, slots), in order: expert(x[token_idx]) * flat_w[slots, None],
        [n, D]; with ``rows``, each expert's tokens in blocks of ``rows`` (expert_rows)."""


def mix_grouped(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: ExpertFn) -> torch.Tensor:
    """The grouped loop over an expert lookup (what ResidentExperts computes): x [T, D], ids/weights [T, A] -> [T, D]."""
    groups = group_by_expert(ids)
    return add_in_order(x, groups, expert_rows([expert(e) for e, _, _ in groups], groups, x, weights.reshape(-1)))


def mix_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: ExpertFn) -> torch.Tensor:
    # x: [T, D], ids/weights: [T, A] -> [T, D]; one token and one slot at a time
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            out[t] += weights[t, slot] * expert(e)(x[t : t + 1])[0]
    return out


def sum_in_order(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_e w[e] * y[e] for one token, one product and one addition per expert in the given order:
    the float operations of the grouped loop, so the bits match. The reference of the one-call mix in
    C (int4_experts.moe_decode_table / mlp.mix_fused), compared bitwise in tests/test_int4_ffn.py.
    x [1, D] (shape/dtype of the result), y [A, D], w [A] -> [1, D]."""
    yw = y * w[:, None]  # [A, D]
    out = torch.zeros_like(x)
    for i in range(yw.shape[0]):
        out.add_(yw[i])
    return out


BATCH_MAX_TOKENS = 1024  # rows of one i4_moe_batch call (its scratch grows with tokens x picks)


def batchable(x: torch.Tensor, ids: torch.Tensor, rows: int | None, min_tokens: int = 2) -> bool:
    """Whether a layer call may take the one-call int4 batch path: at least ``min_tokens`` tokens, no
    per-block calls (``rows``), and no token picking one expert twice."""
    return (rows is None and min_tokens <= x.shape[0] <= BATCH_MAX_TOKENS
            and all(len(set(r)) == ids.shape[1] for r in ids.tolist()))


def mix_batch(mlps: list[GatedMLP], groups: list[Group], x: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor | None:
    """The layer's output [T, D] for the experts of ``groups`` (mlps in the same order, every expert
    the picks name) in one int4 C call (int4_experts.moe_batch_table: the grouped loop's bits), or None
    when the experts are not fusable int4 SwiGLUs of one shape."""
    args = fused_table(mlps)
    if args is None:
        return None
    lut = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64)
    lut[torch.tensor([e for e, _, _ in groups])] = torch.arange(len(groups))  # ascending ids -> 0..n-1: same order
    return int4_experts.moe_batch_table(args[0], x, lut[ids], weights, *args[1:])


def expert_table(experts: list[GatedMLP]) -> torch.Tensor | None:
    """int64 [E, 4] pointer table of a layer's experts (data_ptr of gate_up qweight, gate_up scales,
    down qweight, down scales), or None unless every one is a fusable int4 SwiGLU of one shape (and the
    kernels load, with silu and no biases): the input of the one-call decode (``int4_experts.moe_decode_table``,
    the compiled graph's ``moemesh::moe_decode``); mlp.fused_table's table. The tensors stay owned by the provider."""
    args = fused_table(experts)
    return None if args is None or args[6] is not None else args[1]
