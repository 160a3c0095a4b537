"""A prefill chunk's causal attention over its sequence's keys, computing only the scores a query can see.

A chunk of n queries at positions start..start+n-1 attends to keys 0..start+n-1. Through
``scaled_dot_product_attention`` with a boolean mask, torch's CPU kernel computes every score of the
[n, start + n] block and then masks the upper triangle of its last n columns: 20% of the work of a
2,048-token prompt in 512-token chunks, and the GQA broadcast runs as one small GEMM per query head.
Here query rows go in blocks of ``rows``; block [r, r + b) multiplies only against the keys its last
query sees (start + r + b of them) and masks the b x b triangle at their end, with the query heads of
one KV head stacked into one GEMM ([G b, Dh] x [Dh, keys]). The whole-prompt attention of the
Qwen3-30B-A3B-shaped model (48 layers, 32 query / 4 KV heads of 128, 2,048 tokens in 512-token chunks)
takes ~30 s through the masked SDPA on the 2-core Zen 4: most of a 2,048-token prompt's attention.

The reference is the masked SDPA (dense.DenseKVCache.attend's general path); they agree to fp32
rounding, not bit for bit (tests/test_causal_attention.py). Chunked and layer-major prefill both run
this function over the same chunks, so they still agree bit for bit with each other.
"""
from __future__ import annotations

import torch


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float,
                     rows: int) -> torch.Tensor:
    """q [Hq, n, Dh] at positions start.., keys [Hkv, >= start + n, Dh], values [Hkv, >= start + n, Dv]
    (Hq a multiple of Hkv; query head h uses KV head h // (Hq / Hkv), as SDPA's enable_gqa) -> [Hq, n, Dv]."""
    hq, n, dh = q.shape
    hkv, dv = keys.shape[0], values.shape[-1]
    g = hq // hkv
    qg = q.reshape(hkv, g, n, dh)  # [Hkv, G, n, Dh]
    out = q.new_empty(hkv, g, n, dv)
    for r in range(0, n, rows):
        b = min(rows, n - r)
        end = start + r + b  # keys the block's last query sees
        qb = qg[:, :, r : r + b].reshape(hkv, g * b, dh)  # [Hkv, G b, Dh]
        s = torch.bmm(qb, keys[:, :end].transpose(1, 2)).mul_(scale)  # [Hkv, G b, end]
        tail = s.view(hkv, g, b, end)[..., end - b :]  # [Hkv, G, b, b]: query i sees tail key j <= i
        tail.masked_fill_(torch.ones(b, b, dtype=torch.bool).triu_(1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, :, r : r + b] = torch.bmm(p, values[:, :end]).view(hkv, g, b, dv)
    return out.view(hq, n, dv)
