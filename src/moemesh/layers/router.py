"""Top-k softmax router, as the HF MoE checkpoints define it."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TopKRouter(torch.nn.Module):
    """softmax over all experts in fp32, take the top k, optionally renormalise them.

    Mixtral always renormalises (equivalent to a softmax over the top-k logits); qwen2_moe,
    qwen3_moe and olmoe follow ``norm_topk_prob``.
    """

    def __init__(self, weight: torch.Tensor, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)  # [E, D]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> ids [T, A] int64, weights [T, A] fp32
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights
