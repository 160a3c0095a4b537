"""RMSNorm computed in fp32, as the HF reference does."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)  # [D]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]; one fused op, equal to weight * x * rsqrt(mean(x^2) + eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
