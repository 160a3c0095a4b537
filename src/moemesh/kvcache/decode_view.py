"""One sequence decoding one token, over its own per-layer buffers: the form of a dense KV cache that a
compiled decode step traces (engine/compiled.py runs the model's own module code over it).

The eager cache (``DenseKVCache``) looks its sequences up by id and keeps each length as a Python int,
so a graph traced over it would specialise on both. This view holds what one step needs as graph
inputs instead: each layer's K/V buffers (grown by the cache to fit the new token) and ``pos``, a [1]
int64 tensor holding the sequence's length, read inside the graph as an unbacked int, so one graph
serves every length and every sequence. Attention is ``decode_attention.decode_attention``, the function the eager
cache runs for a one-token query, so both paths do the same arithmetic.
"""
from __future__ import annotations

import torch

from ..batch import BatchLayout
from .base import KVCache
from .decode_attention import decode_attention


class OneTokenView(KVCache):
    """KVCache over one sequence's buffers for one decode token (created inside the traced step)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos: torch.Tensor,
                 value_dim: int, values_in_keys: bool) -> None:
        # keys/values: per layer [Hkv, cap, Dh] / [Hkv, cap, Dv] (values empty with values_in_keys); pos: [1] int64
        self.keys, self.values, self.pos = keys, values, pos
        self.value_dim, self.values_in_keys = value_dim, values_in_keys
        self.current = pos.item()  # the length, an unbacked int inside a graph: nothing specialises on it
        cap = keys[0].shape[1]
        torch._check(self.current >= 0)
        torch._check(self.current < cap)
        # every layer has one capacity (DenseKVCache grows them together): saying so turns 2 x layers
        # size symbols into one (shorter guards and call)
        for t in (*keys, *values):
            torch._check(t.shape[1] == cap)

    def add_sequence(self, seq_id: int) -> None:
        raise NotImplementedError("a one-token view holds exactly one sequence")

    def free_sequence(self, seq_id: int) -> None:
        raise NotImplementedError("a one-token view holds exactly one sequence")

    def length(self, seq_id: int) -> int:
        return self.current

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, batch: BatchLayout,
               scale: float, window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        # q: [1, Hq, Dh], k: [1, Hkv, Dh], v: [1, Hkv, Dv] -> [1, Hq, Dv]
        keys = self.keys[layer]
        keys.index_copy_(1, self.pos, k.transpose(0, 1))  # [Hkv, 1, Dh] at column `length`, in place
        if self.values_in_keys:
            values = keys[..., : self.value_dim]
        else:
            values = self.values[layer]
            values.index_copy_(1, self.pos, v.transpose(0, 1))
        end = self.current + 1
        lo = 0 if window is None else torch.sym_max(0, end - window)
        return decode_attention(q[0], keys[:, lo:end], values[:, lo:end], scale, sinks)[None]

    def end(self, batch: BatchLayout) -> None:
        pass
