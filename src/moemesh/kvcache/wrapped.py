"""A KV cache with per-sequence state of its own beside it (a hybrid model's recurrent states, a
sparse-attention model's indexer keys): attention and lengths are the KV cache's, sequences are
added to and freed from both, and the bytes are both's."""
from __future__ import annotations

from typing import Any

from ..batch import BatchLayout
from .base import KVCache


class WrappedKVCache(KVCache):
    """``kv``: the attention layers' cache; ``side``: anything with add_sequence, free_sequence, nbytes."""

    def __init__(self, kv: KVCache, side: Any) -> None:
        self.kv, self.side = kv, side

    @property
    def supports_starts(self) -> bool:  # type: ignore[override]
        return self.kv.supports_starts

    def add_sequence(self, seq_id: int) -> None:
        self.kv.add_sequence(seq_id)
        self.side.add_sequence(seq_id)

    def free_sequence(self, seq_id: int) -> None:
        self.kv.free_sequence(seq_id)
        self.side.free_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        return self.kv.length(seq_id)

    def begin(self, batch: BatchLayout) -> None:
        self.kv.begin(batch)

    def attend(self, layer, q, k, v, batch, scale, window=None, sinks=None, **kw):
        return self.kv.attend(layer, q, k, v, batch, scale, window, sinks, **kw)

    def end(self, batch: BatchLayout) -> None:
        self.kv.end(batch)

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.side.nbytes()

    def bytes_per_token(self) -> int:
        return self.kv.bytes_per_token()
