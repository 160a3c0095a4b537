"""Grouped-query self-attention with fused q/k/v; the KV cache computes the attention itself."""
from __future__ import annotations

import torch

from ..batch import BatchLayout
from ..kvcache.base import KVCache
from ..quant.qlinear import QuantLinear
from .norm import RMSNorm
from .rope import apply_rope_


class Attention(torch.nn.Module):
    def __init__(
        self,
        layer: int,
        qkv: QuantLinear,
        o_proj: QuantLinear,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        qk_norm: str | None = None,
        clip_qkv: float | None = None,
        window: int | None = None,
        sinks: torch.Tensor | None = None,
        output_gate: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.qkv = qkv  # [(Hq + 2 Hkv) Dh, D]
        self.o_proj = o_proj  # [D, Hq Dh]
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_norm, self.k_norm, self.qk_norm = q_norm, k_norm, qk_norm
        self.clip_qkv = clip_qkv
        self.window = window
        self.scale = head_dim**-0.5
        # gpt-oss: one learned softmax-denominator logit per query head, [Hq]
        self.sinks = None if sinks is None else torch.nn.Parameter(sinks.float(), requires_grad=False)
        # Qwen3-Next / Qwen3.5: q_proj gives [q | gate] per head; the output is scaled by sigmoid(gate)
        self.output_gate = output_gate

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, batch: BatchLayout
    ) -> torch.Tensor:
        # x: [T, D]; cos/sin: [T, 1, Dh]
        t = x.shape[0]
        hq, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        gate = None
        if self.output_gate:
            qg, k, v = self.qkv(x).split([2 * hq * dh, hkv * dh, hkv * dh], dim=-1)
            q, gate = qg.view(t, hq, 2 * dh).split([dh, dh], dim=-1)  # [T, Hq, Dh] each
            q = q.reshape(t, hq * dh)
        else:
            q, k, v = self.qkv(x).split([hq * dh, hkv * dh, hkv * dh], dim=-1)
        if self.qk_norm == "full":  # olmoe: norm over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q, k, v = q.view(t, hq, dh), k.view(t, hkv, dh), v.reshape(t, hkv, dh)
        if self.qk_norm == "head":  # qwen3_moe: norm per head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_(q, cos, sin), apply_rope_(k, cos, sin)  # q, k: views of the qkv output or fresh
        if self.sinks is None:
            out = cache.attend(self.layer, q, k, v, batch, self.scale, self.window)  # [T, Hq, Dh]
        else:
            out = cache.attend(self.layer, q, k, v, batch, self.scale, self.window, sinks=self.sinks)
        out = out.reshape(t, hq * dh)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(t, hq * dh))
        return self.o_proj(out)
