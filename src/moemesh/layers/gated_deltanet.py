"""Gated DeltaNet: the linear-attention layer of Qwen3-Next and Qwen3.5 (a recurrent state per
sequence instead of a KV cache).

Shape legend: T tokens, D hidden, Hk key heads, Hv value heads (a multiple of Hk), K key dim,
Dv value dim, C = 2 Hk K + Hv Dv convolution channels, W the convolution's kernel width.

One projection gives, per token, [q | k | v] (the C channels of a causal depthwise convolution
with SiLU, whose last W - 1 inputs carry over), the output gate z [Hv Dv], and b, a [Hv] each:
beta = sigmoid(b), the log decay g = -exp(A_log) softplus(a + dt_bias). q and k are
l2-normalised, each key head serves Hv / Hk consecutive value heads, q is scaled by K^-0.5, and
the gated delta rule (layers/delta_rule.py) turns them into [Hv, Dv] per token: chunked for a
prompt chunk, token by token for a decode step, carrying the sequence's state across calls. The
result is RMS-normed per head, times silu(z), then projected back to D.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batch import BatchLayout
from ..kvcache.base import KVCache
from ..kvcache.recurrent import StateShape, states_of
from ..quant.qlinear import QuantLinear
from . import delta_rule


@dataclass(frozen=True)
class DeltaNetConfig:
    num_k_heads: int
    num_v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    norm_eps: float

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def state_shape(self) -> StateShape:
        return StateShape(self.conv_dim, self.conv_kernel - 1, self.num_v_heads, self.k_dim, self.v_dim)


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution + SiLU continuing ``state``. x: [n, C], state: [C, W - 1],
    weight: [C, W] -> (out [n, C], new state [C, W - 1])."""
    full = torch.cat([state, x.t()], dim=1)  # [C, W - 1 + n]
    out = F.conv1d(full.unsqueeze(0), weight.unsqueeze(1), groups=weight.shape[0])[0]  # [C, n]
    return F.silu(out.t()), full[:, full.shape[1] - state.shape[1]:].contiguous()


class GatedDeltaNet(torch.nn.Module):
    def __init__(self, layer: int, cfg: DeltaNetConfig, in_proj: QuantLinear, conv_weight: torch.Tensor,
                 a_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor, out_proj: QuantLinear,
                 in_perm: torch.Tensor | None = None) -> None:
        """in_proj: [C + Hv Dv + 2 Hv, D], rows [q; k; v; z; b; a] (or any order ``in_perm``
        gathers into it: Qwen3-Next interleaves them per key head); conv_weight: [C, W]."""
        super().__init__()
        self.layer, self.cfg = layer, cfg  # layer: this layer's index among the linear-attention layers
        self.in_proj, self.out_proj = in_proj, out_proj
        self.in_perm = in_perm  # [C + Hv Dv + 2 Hv] int64 or None
        self.conv_weight = torch.nn.Parameter(conv_weight.float().reshape(cfg.conv_dim, -1), requires_grad=False)
        self.neg_a = torch.nn.Parameter(-a_log.float().exp(), requires_grad=False)  # [Hv]
        self.dt_bias = torch.nn.Parameter(dt_bias.float(), requires_grad=False)  # [Hv]
        self.norm_weight = torch.nn.Parameter(norm_weight.float(), requires_grad=False)  # [Dv]

    def prepare_graph(self) -> str:
        """Before a compiled decode step: this layer has no graph form, so the model decodes eagerly."""
        return "Gated DeltaNet layers (recurrent state) are not in the compiled step"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                batch: BatchLayout) -> torch.Tensor:
        # x: [T, D] (cos, sin unused: no positions in a recurrent layer)
        c, t = self.cfg, x.shape[0]
        proj = self.in_proj(x)  # [T, C + Hv Dv + 2 Hv]
        if self.in_perm is not None:
            proj = proj.index_select(1, self.in_perm)
        mixed, z, b, a = proj.split([c.conv_dim, c.value_dim, c.num_v_heads, c.num_v_heads], dim=-1)
        beta = b.sigmoid()  # [T, Hv]
        g = self.neg_a * F.softplus(a + self.dt_bias)  # [T, Hv] log decay <= 0
        states = states_of(cache)
        core = x.new_empty(t, c.num_v_heads, c.v_dim)  # [T, Hv, Dv]
        for sid, off, n in zip(batch.seq_ids, batch.offsets, batch.query_lens):
            st = states.get(self.layer, sid)
            conv, st.conv = causal_conv(mixed[off : off + n], st.conv, self.conv_weight)  # [n, C]
            q, k, v = conv.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
            q, k = self._heads(q), self._heads(k)  # [n, Hv, K]
            q = q * c.k_dim**-0.5
            rule = delta_rule.recurrent if n == 1 else delta_rule.chunked
            core[off : off + n], st.ssm = rule(q, k, v.reshape(n, c.num_v_heads, c.v_dim), g[off : off + n],
                                               beta[off : off + n], st.ssm)
        out = F.rms_norm(core, (c.v_dim,), self.norm_weight, c.norm_eps) * F.silu(z.view(t, c.num_v_heads, c.v_dim))
        return self.out_proj(out.reshape(t, c.value_dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[n, Hk K] -> l2-normalised [n, Hv, K] (each key head repeated for its value heads)."""
        c = self.cfg
        x = x.reshape(x.shape[0], c.num_k_heads, c.k_dim)
        x = x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)  # the l2norm of the FLA kernels
        return x.repeat_interleave(c.num_v_heads // c.num_k_heads, dim=1)
