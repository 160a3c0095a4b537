"""TurboQuantKVCache's prefix-cache side (kvcache/prefix_cache.py): blocks of codes, a tail of
exact window entries. A mixin, so the cache's file keeps to attention and the window."""
from __future__ import annotations

from typing import Any

import torch

from .quantizer import NORM_DTYPE
from .tq_native import encode


class TurboQuantPrefix:
    # A block is the codes and norms of its tokens, all layers stacked
    # ({"k_codes": [layers, Hkv, words, size] int32, "k_norms": [layers, Hkv, size] fp16, "v_codes",
    # "v_norms"; no v_* with values_in_keys}); tokens still in the window are encoded for the block
    # by the encoder the cache itself uses, so they are the codes the sequence will write later. The
    # tail is the exact window at the export point ({"wk", "wv": [layers, Hkv, nw, Dh] fp32}): a
    # restore there gives back the exporter's state (codes + exact window) bit for bit. ------------
    supports_prefix = True

    def _code_names(self) -> tuple[str, ...]:
        return ("k_codes", "k_norms") if self.values_in_keys else ("k_codes", "k_norms", "v_codes", "v_norms")

    # (st, seq: turboquant._LayerState / _Seq; not imported: that module imports this one)
    def _layer_codes(self, layer: int, st: Any, seq: Any, start: int, end: int) -> dict[str, torch.Tensor]:
        """Codes of tokens [start, end) of one layer: from the history, then encoded from the window."""
        mid = max(start, min(end, seq.coded))
        out = {name: getattr(st.hist, name)[..., start:mid] for name in self._code_names()}
        if mid < end:  # window entries [mid - coded, end - coded)
            i0, i1 = mid - seq.coded, end - seq.coded
            tmp = self._history(i1 - i0)
            if self.lib is not None:
                x = torch.stack([st.wk[:, i0:i1], st.wv[:, i0:i1]])  # [2, Hkv, n, Dh]
                h = tmp
                encode(self.lib, self.native_tables.view(h.k_codes, h.v_codes, h.k_norms, h.v_norms,
                                                         self.quantizers[layer].rt), x, 0, i1 - i0)
            else:
                x = st.wk[:, i0:i1] if self.values_in_keys else torch.stack([st.wk[:, i0:i1], st.wv[:, i0:i1]])
                words, norms = self.quantizers[layer].encode(x)  # [(2,) Hkv, n, words], [(2,) Hkv, n]
                if self.values_in_keys:
                    tmp.k_codes.copy_(words.transpose(1, 2))
                    tmp.k_norms.copy_(norms)
                else:
                    tmp.k_codes.copy_(words[0].transpose(1, 2))
                    tmp.v_codes.copy_(words[1].transpose(1, 2))
                    tmp.k_norms.copy_(norms[0])
                    tmp.v_norms.copy_(norms[1])
            out = {name: torch.cat([out[name], getattr(tmp, name)], dim=-1) for name in out}
        return out

    def export_blocks(self, seq_id, start, end, size):
        seq = self.seqs[seq_id]
        if not (start % size == 0 and end % size == 0 and 0 <= start <= end <= seq.length):
            raise ValueError(f"cannot export tokens [{start}, {end}) of {seq.length} in blocks of {size}")
        per_layer = [self._layer_codes(i, st, seq, start, end) for i, st in enumerate(seq.layers)]
        return [{name: torch.stack([c[name][..., a : a + size] for c in per_layer]) for name in self._code_names()}
                for a in range(0, end - start, size)]

    def export_tail(self, seq_id):
        seq = self.seqs[seq_id]
        nw = seq.length - seq.coded
        tail = {"wk": torch.stack([st.wk[:, :nw] for st in seq.layers])}
        if not self.values_in_keys:
            tail["wv"] = torch.stack([st.wv[:, :nw] for st in seq.layers])
        return tail

    def import_prefix(self, seq_id, blocks, tail):
        seq = self.seqs[seq_id]
        if seq.length:
            raise ValueError(f"sequence {seq_id} is not empty")
        n = sum(b["k_norms"].shape[-1] for b in blocks)
        nw = min(n, self.window)
        if nw and (tail is None or tail["wk"].shape[2] != nw):
            raise ValueError(f"restoring {n} tokens needs the exact window of their last {nw}")
        coded = n - nw
        self._reserve(seq, coded)
        a = 0
        for block in blocks:
            size = min(block["k_norms"].shape[-1], coded - a)
            if size <= 0:
                break
            for layer, st in enumerate(seq.layers):
                for name in self._code_names():
                    getattr(st.hist, name)[..., a : a + size] = block[name][layer][..., :size]
            a += size
        for layer, st in enumerate(seq.layers):
            st.nw, st.view = nw, None
            if nw:
                st.wk[:, :nw] = tail["wk"][layer]
                if not self.values_in_keys:
                    st.wv[:, :nw] = tail["wv"][layer]
        seq.length, seq.coded = n, coded
        return n

    def block_spec(self, size):
        h, w, layers = self.num_kv_heads, self.quantizers[0].words, self.num_layers
        one = {"k_codes": (torch.int32, (layers, h, w, size)), "k_norms": (NORM_DTYPE, (layers, h, size))}
        if not self.values_in_keys:
            one |= {"v_codes": (torch.int32, (layers, h, w, size)), "v_norms": (NORM_DTYPE, (layers, h, size))}
        return one

    def tail_spec(self, length):
        nw = min(length, self.window)
        spec = {"wk": (torch.float32, (self.num_layers, self.num_kv_heads, nw, self.head_dim))}
        if not self.values_in_keys:
            spec["wv"] = (torch.float32, (self.num_layers, self.num_kv_heads, nw, self.head_dim))
        return spec
