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
from ..quant import decode_kernels
from .base import KVCache, causal_mask
from .causal_attention import causal_attention
from .decode_attention import decode_attention
from .decode_view import OneTokenView
from .sinks import attend_with_sinks

SCORE_BLOCK_BYTES = 16 * 2**20  # one block of attention scores (softmax copies: ~3x; engine/memory.py's scratch)


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
        self.score_block_bytes = SCORE_BLOCK_BYTES

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
        # growing by a quarter keeps appends amortised O(1) and a long prompt's first decode step from
        # doubling its KV memory (engine/memory.py counts a quarter of slack)
        new_cap = max(needed, cap + cap // 4, 16)
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
        # a decode token (a query of one) runs as one C call: write its k/v, attend (the reference:
        # decode_attention below, used where the kernels do not run)
        lib = decode_kernels.load() if self.dtype == torch.float32 and decode_kernels.usable(q, k) else None
        if allowed is not None or batch.starts is not None:  # sparse attention, layer-major prefill: the general path
            lib = None
        if lib is not None and len(batch.query_lens) == 1 and batch.query_lens[0] == 1:  # the common decode step
            return self._attend_one(lib, layer, self.seqs[batch.seq_ids[0]], q, k, v, scale, window, sinks)
        if lib is not None and all(n == 1 for n in batch.query_lens):  # a batched decode step: one call
            seqs = [self.seqs[sid] for sid in batch.seq_ids]
            keys = [s.keys[layer] for s in seqs]
            values = keys if self.values_in_keys else [s.values[layer] for s in seqs]
            lo = [0 if window is None else max(0, s.length + 1 - window) for s in seqs]
            return decode_kernels.attend_batch(lib, q, k, None if self.values_in_keys else v, keys, values,
                                               self.value_dim, [s.length for s in seqs], lo, scale, sinks)
        plib = decode_kernels.load() if self.dtype == torch.float32 else None  # (a prompt's chunks)
        if sinks is not None:
            sinks = sinks.float().contiguous()
        out = q.new_empty(q.shape[0], q.shape[1], self.value_dim)  # [T, Hq, Dv]
        for i, (sid, off, n) in enumerate(zip(batch.seq_ids, batch.offsets, batch.query_lens)):
            seq = self.seqs[sid]
            start = seq.length if batch.starts is None else batch.starts[i]
            end = start + n
            lo = 0 if window is None else max(0, end - n - window + 1)  # keys no query can see
            if n == 1 and lib is not None:
                out[off] = self._attend_one(lib, layer, seq, q[off], k[off], None if v is None else v[off],
                                            scale, window, sinks)[0]
                continue
            keys = seq.keys[layer]
            values = keys[..., : self.value_dim] if self.values_in_keys else seq.values[layer]  # a view: nothing stored twice
            keys[:, start:end] = k[off : off + n].transpose(0, 1)
            if not self.values_in_keys:
                values[:, start:end] = v[off : off + n].transpose(0, 1)
            if n == 1 and allowed is None:  # a decode token: the visible keys are one run, no mask
                out[off] = decode_attention(q[off], keys[:, lo:end], values[:, lo:end], scale, sinks)
                continue
            if plib is not None and allowed is None and decode_kernels.prefill_usable(q, keys, values, self.value_dim):
                # key blocks and an online softmax: no [queries, keys] score matrix (attention_prefill.c; the
                # torch paths below are its reference)
                out[off : off + n] = decode_kernels.attend_prefill(plib, q[off : off + n], keys, values, self.value_dim,
                                                                  start, window, scale, sinks)
                continue
            mask = causal_mask(n, start, window)
            if allowed is not None:
                mask = allowed[i] if mask is None else mask & allowed[i]
            if mask is not None:
                mask = mask[:, lo:]
            qs = q[off : off + n].transpose(0, 1)  # [Hq, n, Dh]
            # queries in blocks whose scores [Hq, rows, L] stay within score_block_bytes: a 512-token chunk
            # of gpt-oss (64 heads) against 2,048 keys would otherwise hold ~1.6 GB of scores and softmax
            rows = max(1, self.score_block_bytes // (4 * qs.shape[0] * (end - lo)))
            if mask is not None and window is None and allowed is None and sinks is None and q.shape[1] % keys.shape[0] == 0:
                # plain causal: only the scores a query sees (causal_attention.py; the masked SDPA below is its reference)
                out[off : off + n] = causal_attention(qs, keys, values, start, scale, rows).transpose(0, 1)
                continue
            for r in range(0, n, rows):
                m = None if mask is None else mask[r : r + rows]
                if sinks is not None:  # SDPA has no sink term
                    o = attend_with_sinks(qs[:, r : r + rows], keys[:, lo:end], values[:, lo:end], m, scale, sinks)
                else:
                    o = F.scaled_dot_product_attention(
                        qs[:, r : r + rows], keys[:, lo:end], values[:, lo:end], attn_mask=m, scale=scale,
                        enable_gqa=True)  # [Hq, rows, Dv]
                out[off + r : off + r + o.shape[1]] = o.transpose(0, 1)
        return out

    def _attend_one(self, lib, layer: int, seq: _Seq, q, k, v, scale, window, sinks) -> torch.Tensor:
        """One query token of ``seq`` in one C call (quant/decode_kernels.attend_one) -> [1, Hq, Dv]."""
        keys = seq.keys[layer]
        values = keys if self.values_in_keys else seq.values[layer]
        lo = 0 if window is None else max(0, seq.length + 1 - window)
        return decode_kernels.attend_one(lib, q, k, None if self.values_in_keys else v, keys, values, self.value_dim,
                                         seq.length, lo, scale, sinks)

    def end(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            self.seqs[sid].length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.seqs.values() for t in s.keys + s.values)

    def decode_buffers(self, seq_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        if self.dtype != torch.float32:
            return None
        seq = self.seqs[seq_id]
        self._reserve(seq, seq.length + 1)
        return seq.keys, seq.values

    def decode_view(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos: torch.Tensor) -> KVCache:
        return OneTokenView(keys, values, pos, self.value_dim, self.values_in_keys)
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


