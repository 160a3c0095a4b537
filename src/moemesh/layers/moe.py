"""The MoE feed-forward block and its two expert-mixing paths.

Shape legend: T tokens, D hidden, A active experts per token, E experts.
``mix_grouped`` is the fast path (one matmul per active expert over all its tokens);
``mix_reference`` is the obvious per-token, per-slot loop kept beside it for tests.
"""
from __future__ import annotations

from typing import Callable

import torch

from .mlp import GatedMLP, mix_fused
from .router import TopKRouter

ExpertFn = Callable[[int], GatedMLP]


def group_by_expert(ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """ids [T, A] -> [(expert, token_idx [n], slot_flat_idx [n])] sorted by expert id."""
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


def mix_grouped(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: ExpertFn) -> torch.Tensor:
    # x: [T, D], ids/weights: [T, A] -> [T, D]
    if x.shape[0] == 1:
        fused = mix_one_token(x, ids, weights, expert)
        if fused is not None:
            return fused
    out = torch.zeros_like(x)
    flat_w = weights.reshape(-1)  # [T*A]
    for e, token_idx, slots in group_by_expert(ids):
        y = expert(e)(x[token_idx]) * flat_w[slots, None]  # [n, D]
        accumulate(out, token_idx, y)
    return out


def mix_one_token(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: ExpertFn) -> torch.Tensor | None:
    """Decode fast path: one token's experts in one fused int4 call (int4_ffn.c), or None when they
    are not all fusable. Same products and additions, in the same expert-id order, as the grouped
    loop (whose per-expert calls run the same kernel): the result is bit-identical to it."""
    # x: [1, D], ids/weights: [1, A] -> [1, D]
    idl = ids[0].tolist()
    order = sorted(range(len(idl)), key=idl.__getitem__)
    mlps = [expert(idl[a]) for a in order]
    lib = mlps[0].fused_int4() if isinstance(mlps[0], GatedMLP) else None
    if lib is None or len(set(idl)) != len(idl) or not all(isinstance(m, GatedMLP) and m.fused_int4() for m in mlps):
        return None
    return mix_fused(lib, mlps, x, weights[0, order])  # == sum_in_order(x, run_fused(lib, mlps, x), ...)


def sum_in_order(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_e w[e] * y[e] for one token, one product and one addition per expert in the given
    order: the float operations of the grouped loop (and of LazyExperts), so the bits match. The
    reference of the one-call mix in C (mlp.mix_fused), compared bitwise in tests/test_int4_ffn.py.
    x [1, D] (shape/dtype of the result), y [A, D], w [A] -> [1, D]."""
    yw = y * w[:, None]  # [A, D]
    out = torch.zeros_like(x)
    for i in range(yw.shape[0]):
        out.add_(yw[i])
    return out


def accumulate(out: torch.Tensor, token_idx: torch.Tensor, y: torch.Tensor) -> None:
    """out[token_idx] += y. One decode token: a plain add (index_add_ opens an OpenMP region,
    ~30x slower at this size); the same float additions, so the result is identical."""
    if out.shape[0] == 1:
        out.add_(y)
    else:
        out.index_add_(0, token_idx, y)


def mix_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: ExpertFn) -> torch.Tensor:
    # x: [T, D], ids/weights: [T, A] -> [T, D]; one token and one slot at a time
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            out[t] += weights[t, slot] * expert(e)(x[t : t + 1])[0]
    return out


class MoEBlock(torch.nn.Module):
    """Router -> expert provider -> (+ gated shared expert). Never touches expert weights itself."""

    def __init__(
        self,
        layer: int,
        router: TopKRouter,
        provider: "ExpertProviderLike",
        shared: GatedMLP | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.router = router
        self.provider = provider
        self.shared = shared
        # qwen2_moe: sigmoid(x @ g.T) scales the shared expert; g: [1, D]
        self.shared_gate = None if shared_gate is None else torch.nn.Parameter(shared_gate.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        ids, weights = self.router(x)
        out = self.provider.run(self.layer, x, ids, weights)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(torch.nn.functional.linear(x, self.shared_gate)) * shared
            out = out + shared
        return out


class ExpertProviderLike:
    """Structural type for ``experts.provider.ExpertProvider`` (avoids an import cycle)."""

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...
