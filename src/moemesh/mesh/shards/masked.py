"""Masked mode: each node routes only to its own experts, so a request needs no other node.

Expert sharding normally sends a token's hidden state to whichever node holds each chosen
expert (cross-node traffic at every MoE layer). Masked mode trades quality for zero traffic:
the router of every MoE layer may only pick the experts of one shard. ``MaskedRouter`` wraps a
model's router and excludes the other experts before the top-k; ``mask_model`` does it for
every MoE layer and returns an undo function. bench/masked_quality.py measures what it costs.

Two ways to weigh the surviving experts of a softmax-then-top-k router (``TopKRouter``):
  "logits": softmax over the allowed experts only (the router as if the others never existed);
  "probs":  the exact softmax over all experts, then top-k among the allowed ones (keeps each
            chosen expert's weight as the full model would give it; their sum is then < 1).
With ``norm_topk_prob`` both give the same weights (renormalising cancels the denominator).
For a top-k-then-softmax router (gpt-oss ``LogitTopKRouter``) masking logits is the only way.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...errors import MoemeshError
from ...layers.gpt_oss_moe import LogitTopKRouter
from ...layers.moe import MoEBlock
from ...layers.router import TopKRouter

MODES = ("logits", "probs")


def shard_experts(num_experts: int, num_shards: int) -> list[list[int]]:
    """Contiguous, balanced expert ranges: shard i gets experts [i*E//n, (i+1)*E//n)."""
    if not 1 <= num_shards <= num_experts:
        raise MoemeshError(f"cannot split {num_experts} experts into {num_shards} shards")
    return [list(range(i * num_experts // num_shards, (i + 1) * num_experts // num_shards)) for i in range(num_shards)]


class MaskedRouter(torch.nn.Module):
    """Same call as the wrapped router (x [T, D] -> ids [T, A], weights [T, A]), but only experts
    in ``allowed`` can be chosen."""

    def __init__(self, inner: torch.nn.Module, allowed: list[int], mode: str = "logits") -> None:
        super().__init__()
        if mode not in MODES:
            raise MoemeshError(f"masked mode {mode!r}: expected one of {', '.join(MODES)}")
        if not isinstance(inner, (TopKRouter, LogitTopKRouter)):
            raise MoemeshError(f"masked mode does not support {type(inner).__name__} (grouped routers) yet")
        num_experts = inner.weight.shape[0]
        if len(set(allowed)) < inner.top_k:
            raise MoemeshError(f"a shard of {len(set(allowed))} experts cannot fill top-{inner.top_k} routing")
        if any(not 0 <= e < num_experts for e in allowed):
            raise MoemeshError(f"allowed experts must lie in [0, {num_experts})")
        self.inner = inner
        self.mode = mode
        keep = torch.zeros(num_experts, dtype=torch.bool)
        keep[list(allowed)] = True
        self.register_buffer("keep", keep, persistent=False)  # [E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.inner
        if isinstance(r, LogitTopKRouter):
            logits = F.linear(x, r.weight, r.bias).masked_fill(~self.keep, float("-inf"))  # [T, E]
            top, ids = torch.topk(logits, r.top_k, dim=-1)
            return ids, torch.softmax(top, dim=-1, dtype=torch.float32)
        logits = F.linear(x, r.weight)  # [T, E]
        if self.mode == "logits":
            probs = F.softmax(logits.masked_fill(~self.keep, float("-inf")), dim=-1, dtype=torch.float32)
        else:
            # -1 is below every probability, so an excluded expert is never in the top-k
            probs = F.softmax(logits, dim=-1, dtype=torch.float32).masked_fill(~self.keep, -1.0)
        weights, ids = torch.topk(probs, r.top_k, dim=-1)  # [T, A]
        if r.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


def masked_reference(router: TopKRouter, x: torch.Tensor, allowed: list[int], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious per-token version of MaskedRouter for a TopKRouter (for tests): sort the
    allowed experts by score and take the best k."""
    ids_out, w_out = [], []
    for t in range(x.shape[0]):
        logits = (router.weight @ x[t].float()).tolist()  # [E]
        sub = [logits[e] for e in allowed]
        if mode == "logits":
            z = torch.softmax(torch.tensor(sub), dim=0).tolist()
        else:
            full = torch.softmax(torch.tensor(logits), dim=0).tolist()
            z = [full[e] for e in allowed]
        best = sorted(range(len(allowed)), key=lambda j: -z[j])[: router.top_k]
        w = torch.tensor([z[j] for j in best])
        if router.norm_topk_prob:
            w = w / w.sum()
        ids_out.append([allowed[j] for j in best])
        w_out.append(w)
    return torch.tensor(ids_out), torch.stack(w_out)


def moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def mask_model(model: torch.nn.Module, allowed: list[int] | Callable[[int], list[int]], mode: str = "logits") -> Callable[[], None]:
    """Restrict every MoE layer's router to ``allowed`` experts (a list, or a function of the
    layer index). Returns a function that puts the original routers back."""
    blocks = moe_blocks(model)
    if not blocks:
        raise MoemeshError("masked mode needs an MoE model (no MoE layers found)")
    originals = [(b, b.router) for b in blocks]
    for b in blocks:
        experts = allowed(b.layer) if callable(allowed) else allowed
        b.router = MaskedRouter(b.router, experts, mode)

    def undo() -> None:
        for b, r in originals:
            b.router = r

    return undo
