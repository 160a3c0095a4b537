"""Gated MLP (SwiGLU): the dense FFN, every routed expert and the shared expert."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .qlinear import QuantLinear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, gate_up: QuantLinear, down: QuantLinear, act: str = "silu") -> None:
        super().__init__()
        self.gate_up = gate_up  # [2I, D]
        self.down = down  # [D, I]
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} not supported (have {sorted(ACTIVATIONS)})")
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [T, I] each
        return self.down(ACTIVATIONS[self.act_name](gate) * up)

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()
