"""Gated experts on BlockLinear weights: the per-expert path and the fused one-token call.

An expert is (gate_up, down): gate_up a BlockLinear [2I, D] whose rows are the gate rows then the up
rows (quant/blocks.concat_rows), down [D, I]; either may carry a bias (gpt-oss). ``act`` is "silu"
(silu(g) * u) or "gpt_oss_swiglu" (layers/gpt_oss_moe.ClampedSwiGLU: (clamp(u) + 1) * g * sigmoid(alpha g),
g clamped above at ``limit``).

``expert_forward`` is the per-expert path: down(activation(gate_up(x))). ``experts_mix`` runs one
token through A experts and their weighted sum in the given order in one C call (blocks_ffn.c); its
bits equal the per-expert path followed by ``sum_in_order`` (experts/mixing.sum_in_order's operations:
one product and one addition per expert), whatever the number of experts or threads. With the C
library unavailable (or MOEMESH_BLOCKS_NATIVE=0) both run in torch: activation() then uses torch's
silu/sigmoid, so bits are comparable within one mode, not across modes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import blocks_native
from .blocks import BlockLinear

ACTS = ("silu", "gpt_oss_swiglu")
Expert = tuple[BlockLinear, BlockLinear]  # (gate_up [2I, D], down [D, I])


def activation(h: torch.Tensor, act: str = "silu", alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """[gate | up] h fp32 [M, 2I] -> [M, I]; the C function when the block kernels load."""
    if act not in ACTS:
        raise ValueError(f"activation {act!r} not supported by block experts (have {', '.join(ACTS)})")
    lib = blocks_native.load_native()
    if lib is not None:
        return blocks_native.activation(lib, act, h, alpha, limit)
    gate, up = h.float().chunk(2, dim=-1)  # [M, I] each
    if act == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def expert_forward(x: torch.Tensor, expert: Expert, act: str = "silu", alpha: float = 1.702,
                   limit: float = 7.0) -> torch.Tensor:
    """One expert, any number of rows: x fp32 [M, D] -> [M, D]."""
    gate_up, down = expert
    return down(activation(gate_up(x), act, alpha, limit))


def sum_in_order(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_e w[e] * y[e], one product then one addition per expert in order (experts/mixing.sum_in_order's
    operations, which this layer cannot import): x [1, D] (shape of the result), y [A, D], w [A] -> [1, D]."""
    yw = y * w[:, None]  # [A, D]
    out = torch.zeros_like(x)
    for i in range(yw.shape[0]):
        out.add_(yw[i])
    return out


def fusable(experts: list[Expert]) -> bool:
    """Whether one C call can run these experts: one shape, qtype pair and row strides for all."""
    if not experts:
        return False
    gu0, dn0 = experts[0]
    key = lambda e: (e[0].qtype, e[0].in_features, e[0].out_features, e[0].raw.stride(0),  # noqa: E731
                     e[1].qtype, e[1].in_features, e[1].out_features, e[1].raw.stride(0))
    return (gu0.out_features == 2 * dn0.in_features and dn0.out_features == gu0.in_features
            and all(key(e) == key(experts[0]) for e in experts))


def experts_mix(x: torch.Tensor, experts: list[Expert], weights: torch.Tensor | None, act: str = "silu",
                alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """One token x [1, D] through ``experts``: with weights fp32 [A], sum_e weights[e] * expert_e(x) in
    the given order -> [1, D]; with weights None, each expert's output -> [A, D]. The per-expert path's
    bits (then sum_in_order's)."""
    if act not in ACTS:
        raise ValueError(f"activation {act!r} not supported by block experts (have {', '.join(ACTS)})")
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"experts_mix takes one token [1, D], got {tuple(x.shape)}")
    if weights is not None and tuple(weights.shape) != (len(experts),):
        raise ValueError(f"experts_mix: {len(experts)} experts but weights {tuple(weights.shape)}")
    if not experts:
        return torch.zeros(1, x.shape[1]) if weights is not None else torch.zeros(0, x.shape[1])
    lib = blocks_native.load_native()
    if lib is None or not fusable(experts):
        ys = torch.cat([expert_forward(x, e, act, alpha, limit) for e in experts])  # [A, D]
        return ys if weights is None else sum_in_order(x.float(), ys, weights.float())
    gu, dn = experts[0]
    d, inter, n = gu.in_features, dn.in_features, len(experts)
    up_off = inter * gu.raw.stride(0)  # the up rows follow the gate rows
    ptrs = torch.tensor([[e[0].raw.data_ptr() for e in experts], [e[0].raw.data_ptr() + up_off for e in experts],
                         [e[1].raw.data_ptr() for e in experts]], dtype=torch.int64)  # [3, A]: gate, up, down
    bias = torch.tensor([[0 if lin.bias is None else lin.bias.data_ptr() for lin in e] for e in experts],
                        dtype=torch.int64)  # [A, 2]: gate_up bias, down bias (0: none)
    xf = x.float().contiguous()
    w = None if weights is None else weights.float().contiguous()
    out = torch.empty(1 if w is not None else n, d)
    tid = blocks_native.TYPE_IDS
    rc = lib.bk_experts_mix(tid[gu.qtype], tid[dn.qtype], blocks_native.ACT_IDS[act], alpha, limit, xf.data_ptr(),
                            d, inter, n, ptrs[0].data_ptr(), ptrs[1].data_ptr(), ptrs[2].data_ptr(), bias.data_ptr(),
                            gu.raw.stride(0), dn.raw.stride(0), None if w is None else w.data_ptr(), out.data_ptr(),
                            torch.get_num_threads())
    blocks_native.check_rc(rc, f"experts_mix of {n} {gu.qtype}/{dn.qtype} experts [D={d}, I={inter}]")
    return out
