"""Dense fp32 KV cache: one growable [Hkv, capacity, Dh] buffer per layer per sequence.

Values may be narrower than keys (``value_dim``), and with ``values_in_keys`` they are not stored
at all: each value is the first ``value_dim`` coordinates of its key (MLA's absorbed form, where
key = [latent ; rope part] and value = latent), so a token costs one key vector.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..batch import BatchLayout
from .base import KVCache, causal_mask
from .sinks import attend_with_sinks, softmax_with_sinks


@dataclass
class _Seq:
    length: int = 0
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [Hkv, cap, Dh]
    values: list[torch.Tensor] = field(default_factory=list)  # per layer [Hkv, cap, Dv] (empty with values_in_keys)


class DenseKVCache(KVCache):
    supports_starts = True

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        value_dim: int | None = None,
        values_in_keys: bool = False,
    ) -> None:
        """value_dim: width of the values (default head_dim); values_in_keys: values are the
        keys' first value_dim coordinates and are not stored (attend then takes v=None)."""
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        if values_in_keys and self.value_dim > head_dim:
            raise ValueError(f"values_in_keys needs value_dim <= head_dim, got {self.value_dim} > {head_dim}")
        self.values_in_keys = values_in_keys
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
        for i, (sid, n) in enumerate(zip(batch.seq_ids, batch.query_lens)):
            seq = self.seqs[sid]
            self._reserve(seq, max(seq.length, batch.starts[i] if batch.starts is not None else 0) + n)

    def _reserve(self, seq: _Seq, needed: int) -> None:
        cap = seq.keys[0].shape[1] if seq.keys else 0
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 16)  # doubling keeps appends amortised O(1)
        stores = [(seq.keys, self.head_dim)] + ([] if self.values_in_keys else [(seq.values, self.value_dim)])
        for store, dim in stores:
            for layer in range(self.num_layers):
                buf = torch.empty((self.num_kv_heads, new_cap, dim), dtype=self.dtype)
                if cap:  # the whole old buffer: positions written ahead of ``length`` (batch.starts) too
                    buf[:, :cap] = store[layer]
                    store[layer] = buf
                else:
                    store.append(buf)

    def attend(self, layer, q, k, v, batch, scale, window=None, sinks=None, allowed=None):
        """``allowed``: per sequence a bool [n, start + n] of the keys each query may see besides the
        causal rule (DeepSeek sparse attention's top-k selection, kvcache/indexed.py), or None."""
        out = q.new_empty(q.shape[0], q.shape[1], self.value_dim)  # [T, Hq, Dv]
        for i, (sid, off, n) in enumerate(zip(batch.seq_ids, batch.offsets, batch.query_lens)):
            seq = self.seqs[sid]
            start = seq.length if batch.starts is None else batch.starts[i]
            end = start + n
            keys = seq.keys[layer]
            keys[:, start:end] = k[off : off + n].transpose(0, 1)
            if self.values_in_keys:
                values = keys[..., : self.value_dim]  # a view: nothing stored twice
            else:
                values = seq.values[layer]
                values[:, start:end] = v[off : off + n].transpose(0, 1)
            if n == 1 and (window is None or end <= window) and allowed is None:
                out[off] = decode_attention(q[off], keys[:, :end], values[:, :end], scale, sinks)
                continue
            lo = 0 if window is None else max(0, end - n - window + 1)  # keys no query can see
            mask = causal_mask(n, start, window)
            if allowed is not None:
                mask = allowed[i] if mask is None else mask & allowed[i]
            if mask is not None:
                mask = mask[:, lo:]
            qs = q[off : off + n].transpose(0, 1)  # [Hq, n, Dh]
            if sinks is not None:  # SDPA has no sink term
                o = attend_with_sinks(qs, keys[:, lo:end], values[:, lo:end], mask, scale, sinks)
            else:
                o = F.scaled_dot_product_attention(
                    qs, keys[:, lo:end], values[:, lo:end], attn_mask=mask, scale=scale, enable_gqa=True
                )  # [Hq, n, Dv]
            out[off : off + n] = o.transpose(0, 1)
        return out

    def end(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            self.seqs[sid].length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.seqs.values() for t in s.keys + s.values)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """One query token over all its keys, GQA without repeating K/V (fewer ops than SDPA's math
    path for this case). q: [Hq, Dh], keys: [Hkv, L, Dh], values: [Hkv, L, Dv] -> [Hq, Dv]."""
    hkv, _, dh = keys.shape
    qg = q.view(hkv, -1, dh)  # [Hkv, G, Dh]
    scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(scale)  # [Hkv, G, L]
    probs = torch.softmax(scores, dim=-1) if sinks is None else softmax_with_sinks(scores, sinks, 1)
    return torch.bmm(probs, values).view(-1, values.shape[-1])
