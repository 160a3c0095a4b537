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
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            self._reserve(self.seqs[sid], self.seqs[sid].length + n)

    def _reserve(self, seq: _Seq, needed: int) -> None:
        cap = seq.keys[0].shape[1] if seq.keys else 0
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 16)  # doubling keeps appends amortised O(1)
        stores = [(seq.keys, self.head_dim)] + ([] if self.values_in_keys else [(seq.values, self.value_dim)])
        for store, dim in stores:
            for layer in range(self.num_layers):
                buf = torch.empty((self.num_kv_heads, new_cap, dim), dtype=self.dtype)
                if cap:
                    buf[:, : seq.length] = store[layer][:, : seq.length]
                    store[layer] = buf
                else:
                    store.append(buf)

    def attend(self, layer, q, k, v, batch, scale, window=None, sinks=None):
        out = q.new_empty(q.shape[0], q.shape[1], self.value_dim)  # [T, Hq, Dv]
        for sid, off, n in zip(batch.seq_ids, batch.offsets, batch.query_lens):
            seq = self.seqs[sid]
            start, end = seq.length, seq.length + n
            keys = seq.keys[layer]
            keys[:, start:end] = k[off : off + n].transpose(0, 1)
            if self.values_in_keys:
                values = keys[..., : self.value_dim]  # a view: nothing stored twice
            else:
                values = seq.values[layer]
                values[:, start:end] = v[off : off + n].transpose(0, 1)
            if n == 1 and (window is None or end <= window):
                out[off] = decode_attention(q[off], keys[:, :end], values[:, :end], scale, sinks)
                continue
            lo = 0 if window is None else max(0, end - n - window + 1)  # keys no query can see
            mask = causal_mask(n, start, window)
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

    def bytes_per_token(self) -> int:
        dims = self.head_dim + (0 if self.values_in_keys else self.value_dim)
        return self.num_layers * self.num_kv_heads * dims * self.dtype.itemsize

    # -- prefix reuse: a block is {"k": [layers, Hkv, size, Dh], "v": [layers, Hkv, size, Dv]} (no
    # "v" with values_in_keys), copies of the buffers' rows, so a restore is bit-exact -------------
    supports_prefix = True

    def _stores(self, seq: _Seq) -> list[tuple[str, list[torch.Tensor]]]:
        return [("k", seq.keys)] + ([] if self.values_in_keys else [("v", seq.values)])

    def export_blocks(self, seq_id, start, end, size):
        seq = self.seqs[seq_id]
        if not (start % size == 0 and end % size == 0 and 0 <= start <= end <= seq.length):
            raise ValueError(f"cannot export tokens [{start}, {end}) of {seq.length} in blocks of {size}")
        return [{name: torch.stack([buf[:, a : a + size] for buf in store]) for name, store in self._stores(seq)}
                for a in range(start, end, size)]

    def import_prefix(self, seq_id, blocks, tail):
        seq = self.seqs[seq_id]
        if seq.length:
            raise ValueError(f"sequence {seq_id} is not empty")
        n = sum(b["k"].shape[2] for b in blocks)
        self._reserve(seq, n)
        a = 0
        for block in blocks:  # block by block: no temporary as large as the whole prefix
            size = block["k"].shape[2]
            for name, store in self._stores(seq):
                for layer, buf in enumerate(store):
                    buf[:, a : a + size] = block[name][layer]
            a += size
        seq.length = n
        return n

    def block_spec(self, size):
        spec = {"k": (self.dtype, (self.num_layers, self.num_kv_heads, size, self.head_dim))}
        if not self.values_in_keys:
            spec["v"] = (self.dtype, (self.num_layers, self.num_kv_heads, size, self.value_dim))
        return spec


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
