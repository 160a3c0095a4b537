"""An int4 trunk inside an expert store: the trunk's linear weights quantized once at convert time.

Loading a float trunk and quantizing it at load maps the whole float file (its pages count in the
process's RSS and in a cgroup's page cache) and builds float transients; a trunk stored as int4
groups is read at a quarter of bf16's bytes and goes straight into the int4 kernel. Each linear
weight NAME [N, K] (K % 32 == 0) is stored as three tensors instead of NAME:

    NAME.q4        uint8 [N, K/2]   nibbles in row order: low nibble = even column
    NAME.q4_scale  bf16  [N, K/32]  per (row, group of 32)
    NAME.q4_zero   bf16  [N, K/32]  w = (q - 8) * scale + zero (the kernel's formula)

i.e. exactly the values ``QuantLinear.from_float(w, None, "int4")`` computes at load (same
``int4_quantize``), so a store with an int4 trunk decodes like one quantized at load, bit for bit.
Which weights are linears is taken from the model builder itself (``loading.convert.linear_names``): whatever goes
through ``Builder.linear`` (attention, dense MLPs, shared experts), never norms or routers. The
output head's table (lm_head, or the tied embedding) keeps its float tensor (embedding rows and the
head's exact rescoring read it) and gains the three int4 tensors beside it: the head's int4 matmul
is then built from them, never by reading the whole float table at load.
"""
from __future__ import annotations

import torch

from .qlinear import int4_quantize

GROUP = 32
Int4Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q uint8 [O, I], scale [O, I/g], min [O, I/g]
Q, SCALE, ZERO = ".q4", ".q4_scale", ".q4_zero"


def quantize(w: torch.Tensor, rows: int = 4096) -> dict[str, torch.Tensor]:
    """w [N, K] (any float dtype) -> {".q4": packed, ".q4_scale": bf16, ".q4_zero": bf16}; per row, in
    chunks of ``rows`` so a vocab-sized table is never whole in fp32."""
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i in range(0, w.shape[0], rows):
        q, scale, zero = int4_quantize(w[i : i + rows].float(), GROUP)  # q int32 [n, K], scale/zero [n, K/32]
        q8 = q.to(torch.uint8)
        parts.append(((q8[:, 0::2] | (q8[:, 1::2] << 4)), scale.to(torch.bfloat16), zero.to(torch.bfloat16)))
    return {sfx: torch.cat([p[j] for p in parts]).contiguous() for j, sfx in enumerate((Q, SCALE, ZERO))}


def from_groups(groups: Int4Groups) -> dict[str, torch.Tensor]:
    """Exact 4-bit groups of a GGUF tensor (w = q * scale + min) in the same three tensors."""
    q, scale, minv = groups
    q8 = q.to(torch.uint8)
    zero = minv.float() + 8 * scale.float()  # w = (q - 8) * scale + zero
    return {Q: (q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous(), SCALE: scale.to(torch.bfloat16),
            ZERO: zero.to(torch.bfloat16)}


def groups(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Int4Groups:
    """The stored tensors -> (q uint8 [N, K], scale fp32, min fp32) for QuantLinear.from_int4_groups."""
    n, half = packed.shape
    q = torch.empty(n, 2 * half, dtype=torch.uint8)
    torch.bitwise_and(packed, 15, out=q[:, 0::2])
    torch.bitwise_right_shift(packed, 4, out=q[:, 1::2])
    s = scale.float()
    return q, s, zero.float() - 8 * s  # min = zero - 8 * scale: exact for bf16 scale and zero


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] of the stored weight (for callers that want the float tensor)."""
    q, s, _ = groups(packed, scale, zero)
    n, k = q.shape
    w = q.view(n, k // GROUP, GROUP).float().sub_(8).mul_(s[..., None]).add_(zero.float()[..., None])
    return w.view(n, k)


def quantizable(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] % GROUP == 0 and t.is_floating_point()
