"""Attention of one query token over one sequence's cached keys and values (a decode step's attention).

GQA without repeating K/V: query head h uses KV head h // (Hq / Hkv). Used by the dense cache for every
one-token query (whatever else shares the batch) and by its one-token view in compiled graphs.
"""
from __future__ import annotations

import torch

from .sinks import softmax_with_sinks


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """q: [Hq, Dh], keys: [Hkv, L, Dh], values: [Hkv, L, Dv] (the visible keys only: no mask) -> [Hq, Dv]."""
    hkv, _, dh = keys.shape
    qg = q.reshape(hkv, -1, dh)  # [Hkv, G, Dh]
    scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(scale)  # [Hkv, G, L]
    probs = torch.softmax(scores, dim=-1) if sinks is None else softmax_with_sinks(scores, sinks, 1)
    return torch.bmm(probs, values).reshape(-1, values.shape[-1])
