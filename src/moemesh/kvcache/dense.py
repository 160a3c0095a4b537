"""Dense fp32 KV cache: one growable [Hkv, capacity, Dh] buffer per layer per sequence."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layers.batch import BatchLayout
from .base import KVCache, causal_mask


@dataclass
class _Seq:
    length: int = 0
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [Hkv, cap, Dh]
    values: list[torch.Tensor] = field(default_factory=list)


class DenseKVCache(KVCache):
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.seqs: dict[int, _Seq] = {}

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already in the cache")
        self.seqs[seq_id] = _Seq()

    def free_sequence(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    def begin(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            self._reserve(self.seqs[sid], self.seqs[sid].length + n)

    def _reserve(self, seq: _Seq, needed: int) -> None:
        cap = seq.keys[0].shape[1] if seq.keys else 0
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 16)  # doubling keeps appends amortised O(1)
        shape = (self.num_kv_heads, new_cap, self.head_dim)
        for store in (seq.keys, seq.values):
            for layer in range(self.num_layers):
                buf = torch.empty(shape, dtype=self.dtype)
                if cap:
                    buf[:, : seq.length] = store[layer][:, : seq.length]
                    store[layer] = buf
                else:
                    store.append(buf)

    def attend(self, layer, q, k, v, batch, scale, window=None):
        out = torch.empty_like(q)  # [T, Hq, Dh]
        for sid, off, n in zip(batch.seq_ids, batch.offsets, batch.query_lens):
            seq = self.seqs[sid]
            start, end = seq.length, seq.length + n
            keys, values = seq.keys[layer], seq.values[layer]
            keys[:, start:end] = k[off : off + n].transpose(0, 1)
            values[:, start:end] = v[off : off + n].transpose(0, 1)
            if n == 1 and (window is None or end <= window):
                out[off] = decode_attention(q[off], keys[:, :end], values[:, :end], scale)
                continue
            lo = 0 if window is None else max(0, end - n - window + 1)  # keys no query can see
            mask = causal_mask(n, start, window)
            if mask is not None:
                mask = mask[:, lo:]
            qs = q[off : off + n].transpose(0, 1)  # [Hq, n, Dh]
            o = F.scaled_dot_product_attention(
                qs, keys[:, lo:end], values[:, lo:end], attn_mask=mask, scale=scale, enable_gqa=True
            )  # [Hq, n, Dh]
            out[off : off + n] = o.transpose(0, 1)
        return out

    def end(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            self.seqs[sid].length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.seqs.values() for t in s.keys + s.values)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token over all its keys, GQA without repeating K/V (fewer ops than SDPA's math
    path for this case). q: [Hq, Dh], keys/values: [Hkv, L, Dh] -> [Hq, Dh]."""
    hkv, _, dh = keys.shape
    qg = q.view(hkv, -1, dh)  # [Hkv, G, Dh]
    probs = torch.softmax(torch.bmm(qg, keys.transpose(1, 2)).mul_(scale), dim=-1)  # [Hkv, G, L]
    return torch.bmm(probs, values).view(-1, dh)
