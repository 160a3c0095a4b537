"""RMSNorm computed in fp32, as the HF reference does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import decode_kernels


class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)  # [D]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D] -> [..., D]; one C call (quant/decode_kernels.c) where it runs, else the reference
        lib = None if torch.compiler.is_compiling() else decode_kernels.load()
        if lib is not None and decode_kernels.usable(x):
            return decode_kernels.rms_norm(lib, x, self.weight, self.eps)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        # one torch op, equal to weight * x * rsqrt(mean(x^2) + eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
