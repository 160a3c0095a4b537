"""gpt-oss's MoE pieces: the biased top-k-then-softmax router and the clamped-SwiGLU expert.

Both mirror transformers' GptOssTopKRouter and GptOssExperts. The checkpoint's fused
``gate_up_proj`` interleaves gate and up columns; the builder de-interleaves them once at load,
so the expert's fused ``gate_up`` linear holds [gate rows; up rows] like every other GatedMLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import blocks_ffn, decode_kernels, int4_experts
from ..quant.blocks import BlockLinear
from ..quant.qlinear import QuantLinear
from .mlp import GatedMLP

ACT_NAME = "gpt_oss_swiglu"


class ClampedSwiGLU(GatedMLP):
    """down((clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)), g = clamp(gate, max=l); both
    linears carry biases."""

    def __init__(self, gate_up: QuantLinear, down: QuantLinear, alpha: float, limit: float) -> None:
        super().__init__(gate_up, down, "silu")
        self.act_name = ACT_NAME
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        block = self.block_act()
        if block is not None:  # block-format weights: blocks_ffn's C activation (same operations, its exp)
            return self.down(blocks_ffn.activation(self.gate_up(x), *block))
        if self.fused_int4() is not None:  # int4 weights: the fused kernels and their act (GatedMLP's paths)
            return super().forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' operations in torch (any weights; the reference of the C acts)."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [T, I] each
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return self.down((up + 1) * glu)

    def kernel_act(self) -> tuple[int, float, float]:
        return int4_experts.ACT_CLAMP_SWIGLU, self.alpha, self.limit

    def block_act(self) -> tuple[str, float, float] | None:
        if not (isinstance(self.gate_up, BlockLinear) and isinstance(self.down, BlockLinear)):
            return None
        return ACT_NAME, self.alpha, self.limit


class LogitTopKRouter(torch.nn.Module):
    """top-k over the biased router logits, then a softmax over the k chosen logits."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.float().contiguous(), requires_grad=False)  # [E, D]
        self.bias = torch.nn.Parameter(bias.float().contiguous(), requires_grad=False)  # [E]
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> ids [T, A] int64, weights [T, A] fp32. One C call per call where the library is built
        # and outside graphs (decode_kernels.router_logits_topk: as TopKRouter's, ~5 torch ops' dispatch saved)
        lib = decode_kernels.load() if x.dim() == 2 and decode_kernels.usable(x, self.weight, self.bias) else None
        if lib is not None:
            picked = decode_kernels.router_logits_topk(lib, x, self.weight, self.bias, self.top_k)
            if picked is not None:
                return picked
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D] -> ids [T, A] int64, weights [T, A] fp32 (torch ops; the C call's values up to summation order)
        logits = F.linear(x, self.weight, self.bias)  # [T, E]
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return ids, torch.softmax(top, dim=-1, dtype=torch.float32)


def deinterleave(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] with gate at even, up at odd positions -> [..., 2I] as [gate; up]."""
    return torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], dim=-1)
