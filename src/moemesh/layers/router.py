"""Top-k softmax router, as the HF MoE checkpoints define it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import decode_kernels


class TopKRouter(torch.nn.Module):
    """softmax over all experts in fp32, take the top k, optionally renormalise them.

    Mixtral always renormalises (equivalent to a softmax over the top-k logits); qwen2_moe,
    qwen3_moe and olmoe follow ``norm_topk_prob``. Rows run as one C call (decode_kernels.router_topk:
    four torch ops on a [1, E] row cost ~30-60 us of dispatch per decode layer, more than the experts of
    a small model) where the library is built and outside compiled graphs; ``reference`` is the torch
    form (same values up to summation order; the C call's rows do not depend on the batch).
    """

    def __init__(self, weight: torch.Tensor, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float().contiguous(), requires_grad=False)  # [E, D]
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> ids [T, A] int64, weights [T, A] fp32
        lib = decode_kernels.load() if x.dim() == 2 and decode_kernels.usable(x, self.weight) else None  # (graphs: torch)
        if lib is not None:
            picked = decode_kernels.router_topk(lib, x, self.weight, self.top_k, self.norm_topk_prob)
            if picked is not None:
                return picked
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> ids [T, A] int64, weights [T, A] fp32 (torch ops)
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights
