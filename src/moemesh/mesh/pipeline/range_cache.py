"""RangeCache: a KV cache of layers [start, end) seen through the model's global layer numbers.

Decoder layers keep their global index (``attn.layer``) so one built layer can serve in any range a
plan gives its node; the cache of a range holds only that range's layers (local 0 = ``start``).
"""
from __future__ import annotations

import torch

from ...batch import BatchLayout
from ...kvcache.base import KVCache


class RangeCache(KVCache):
    def __init__(self, inner: KVCache, start: int) -> None:
        self.inner, self.start = inner, start

    def add_sequence(self, seq_id: int) -> None:
        self.inner.add_sequence(seq_id)

    def free_sequence(self, seq_id: int) -> None:
        self.inner.free_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        return self.inner.length(seq_id)

    def begin(self, batch: BatchLayout) -> None:
        self.inner.begin(batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BatchLayout, scale: float,
               window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        if sinks is not None:  # gpt_oss; other caches' attend may not take the keyword
            return self.inner.attend(layer - self.start, q, k, v, batch, scale, window, sinks=sinks)
        return self.inner.attend(layer - self.start, q, k, v, batch, scale, window)

    def end(self, batch: BatchLayout) -> None:
        self.inner.end(batch)

    def nbytes(self) -> int:
        return self.inner.nbytes()
