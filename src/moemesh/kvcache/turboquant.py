"""TurboQuant KV cache: old tokens as packed Lloyd-Max codes + norms, recent ones exact.

Per sequence and layer, tokens [0, coded) are stored as codes (``CodedHistory``: bit-packed codes
of the rotated unit vector, float16 norm) and tokens [coded, length) - at most ``window`` of
them, the most recent - in full precision (fp32) in a fixed [Hkv, window + 1, Dh] buffer. A
forward pass sees its own chunk in full precision too; after it, tokens that fell out of the
window are encoded (each exactly once). Attention reads the codes directly (``attend_codes``,
or the C decode step for one-token steps when it can be built); ``mode="dequant"`` runs the
plain dequantize-then-attend reference instead. Each layer has its own rotation (seed + layer).

``values_in_keys`` (MLA's latent cache): each value is the first ``value_dim`` coordinates of its
key, so only keys are coded and kept; the value sum is taken over the key codes in the rotated
basis, rotated back once and cut to ``value_dim``. The C kernels assume separate value codes, so
this mode uses the torch path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import BatchLayout
from .base import KVCache
from .quantizer import NORM_DTYPE, TurboQuantizer
from .tq_attention import CodedHistory, attend_codes, attend_dequant, dequantized_history
from .tq_native import CodedView, NativeTables, decode_step, encode, load_native
from .turboquant_prefix import TurboQuantPrefix

BITS_CHOICES = (2.0, 2.5, 3.0, 3.5, 4.0)  # the rates the CLI offers; the quantizer takes more
DEFAULT_WINDOW = 32
CAP_BLOCK = 32  # code buffers grow in blocks of this many tokens (see _reserve)
MODES = ("codes", "dequant")


@dataclass
class _LayerState:
    hist: CodedHistory
    wk: torch.Tensor  # [Hkv, window + 1, Dh] float32; [:, :nw] = positions [coded, length)
    wv: torch.Tensor
    nw: int = 0
    view: CodedView | None = None  # the C kernels' struct over ``hist`` (rebuilt when hist grows)


@dataclass
class _Seq:
    length: int = 0
    coded: int = 0  # tokens [0, coded) are codes; invariant: length - coded == min(length, window)
    layers: list[_LayerState] = field(default_factory=list)


class TurboQuantKVCache(TurboQuantPrefix, KVCache):
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        bits: float = 3.5,
        window: int = DEFAULT_WINDOW,
        seed: int = 0,
        mode: str = "codes",
        native: bool | None = None,
        value_dim: int | None = None,
        values_in_keys: bool = False,
    ) -> None:
        """mode: "codes" (attention from codes) or "dequant" (reference). native: use the C
        kernels (None: when they can be built; False: never; True: required). value_dim and
        values_in_keys: as DenseKVCache (values narrower than keys only as the keys' prefix)."""
        self.value_dim = head_dim if value_dim is None else value_dim
        if self.value_dim != head_dim and not values_in_keys:
            raise ValueError("TurboQuant codes values as wide as keys; narrower values need values_in_keys")
        if values_in_keys and (self.value_dim > head_dim or native):
            raise ValueError("values_in_keys needs value_dim <= head_dim and the torch path (native=False/None)")
        self.values_in_keys = values_in_keys
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.bits, self.window, self.mode = bits, window, mode
        first = TurboQuantizer(head_dim, bits, seed)
        self.quantizers = [first] + [
            TurboQuantizer(head_dim, bits, seed + i, first.codebooks) for i in range(1, num_layers)
        ]
        self.seqs: dict[int, _Seq] = {}
        usable = mode == "codes" and not values_in_keys and NativeTables.supports(first.layout, head_dim)
        self.lib = load_native() if native is not False and usable else None
        if native and self.lib is None:
            raise RuntimeError("the native TurboQuant kernels are unavailable (see tq_native.py)")
        self.native_tables = NativeTables(first.layout, first.codebooks) if usable else None
        self.needs_tail = window > 0  # a restore needs the exact window the exporter held

    # -- sequences -------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already in the cache")
        shape = (self.num_kv_heads, self.window + 1, self.head_dim)
        v_shape = (self.num_kv_heads, 0, 0) if self.values_in_keys else shape
        self.seqs[seq_id] = _Seq(layers=[
            _LayerState(self._history(0), torch.empty(shape), torch.empty(v_shape)) for _ in range(self.num_layers)
        ])

    def free_sequence(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    def _history(self, cap: int) -> CodedHistory:
        h, w = self.num_kv_heads, self.quantizers[0].words
        k_codes, k_norms = torch.empty(h, w, cap, dtype=torch.int32), torch.empty(h, cap, dtype=NORM_DTYPE)
        if self.values_in_keys:  # value codes are the key codes (aliases, stored once)
            return CodedHistory(k_codes, k_norms, k_codes, k_norms)
        return CodedHistory(
            k_codes, k_norms, torch.empty(h, w, cap, dtype=torch.int32), torch.empty(h, cap, dtype=NORM_DTYPE),
        )

    # -- forward protocol ------------------------------------------------------------------
    def begin(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            seq = self.seqs[sid]
            self._reserve(seq, max(seq.coded, seq.length + n - self.window))

    def _reserve(self, seq: _Seq, needed: int) -> None:
        """Grow the code buffers to ``needed`` tokens rounded up to CAP_BLOCK. Linear growth is
        cheap here: copying the history every CAP_BLOCK steps costs a fraction 1/CAP_BLOCK of
        what attention already reads every step, and the slack stays under one block."""
        cap = seq.layers[0].hist.k_norms.shape[1]
        if needed <= cap:
            return
        new_cap = -(-needed // CAP_BLOCK) * CAP_BLOCK
        for st in seq.layers:
            old, st.hist, st.view = st.hist, self._history(new_cap), None
            for name in ("k_codes", "v_codes"):
                getattr(st.hist, name)[..., : seq.coded] = getattr(old, name)[..., : seq.coded]
            for name in ("k_norms", "v_norms"):
                getattr(st.hist, name)[:, : seq.coded] = getattr(old, name)[:, : seq.coded]

    def _view(self, layer: int, st: _LayerState) -> CodedView:
        if st.view is None:
            h = st.hist
            st.view = self.native_tables.view(h.k_codes, h.v_codes, h.k_norms, h.v_norms, self.quantizers[layer].rt)
        return st.view

    def attend(self, layer, q, k, v, batch, scale, window=None, sinks=None):
        # q: [T, Hq, Dh], k: [T, Hkv, Dh], v: [T, Hkv, Dv] or None (values_in_keys) -> [T, Hq, Dv]
        tq = self.quantizers[layer]
        out = q.new_empty(q.shape[0], q.shape[1], self.value_dim)
        for sid, off, n in zip(batch.seq_ids, batch.offsets, batch.query_lens):
            seq = self.seqs[sid]
            st = seq.layers[layer]
            if n == 1 and self.lib is not None and sinks is None:  # the C step has no sink term
                out[off] = self._native_step(layer, st, seq, q[off], k[off], v[off], scale, window)
                continue
            exact_k = torch.cat([st.wk[:, : st.nw], k[off : off + n].transpose(0, 1).float()], dim=1)  # [Hkv, nw+n, Dh]
            if self.values_in_keys:
                exact_v = exact_k[..., : self.value_dim]  # [Hkv, nw+n, Dv] view
            else:
                exact_v = torch.cat([st.wv[:, : st.nw], v[off : off + n].transpose(0, 1).float()], dim=1)
            qs = q[off : off + n]  # [n, Hq, Dh]
            if self.mode == "codes":
                out[off : off + n] = attend_codes(tq, qs, st.hist, seq.coded, exact_k, exact_v, seq.length, scale, window,
                                                  sinks)
            else:  # the reference: decode the history, then standard attention
                keys, values = dequantized_history(tq, st.hist, seq.coded, exact_k, exact_v)
                out[off : off + n] = attend_dequant(qs, keys, values, seq.length, scale, window, sinks)
            self._evict(layer, st, seq.coded, exact_k, exact_v)
        return out

    def _native_step(self, layer: int, st: _LayerState, seq: _Seq, q, k, v, scale: float, window: int | None):
        """One token through the C decode step (attention, window append, eviction) -> [Hq, Dh]."""
        lo = 0 if window is None else max(0, seq.length - window + 1)
        e0 = max(lo, seq.coded) - seq.coded
        o, evicted = decode_step(self.lib, self._view(layer, st), q.float().contiguous(), scale,
                                 k.float().contiguous(), v.float().contiguous(), st.wk, st.wv, st.nw,
                                 self.window, min(lo, seq.coded), seq.coded, e0)
        st.nw += 1 - evicted
        return o

    def _evict(self, layer: int, st: _LayerState, coded: int, exact_k: torch.Tensor, exact_v: torch.Tensor) -> None:
        """Encode the tokens that left the window; keep the last ``window`` exact."""
        e = max(0, exact_k.shape[1] - self.window)
        if e and self.values_in_keys:  # keys only: the values are their prefixes
            h = st.hist
            words, norms = self.quantizers[layer].encode(exact_k[:, :e])  # [Hkv, e, words], [Hkv, e]
            h.k_codes[:, :, coded : coded + e] = words.transpose(1, 2)
            h.k_norms[:, coded : coded + e] = norms
        elif e:
            h, x = st.hist, torch.stack([exact_k[:, :e], exact_v[:, :e]])  # [2, Hkv, e, Dh]
            if self.lib is not None:  # the C encoder, as the decode step uses
                encode(self.lib, self._view(layer, st), x, coded, h.k_norms.shape[1])
            else:
                words, norms = self.quantizers[layer].encode(x)  # [2, Hkv, e, words], [2, Hkv, e]
                h.k_codes[:, :, coded : coded + e] = words[0].transpose(1, 2)
                h.v_codes[:, :, coded : coded + e] = words[1].transpose(1, 2)
                h.k_norms[:, coded : coded + e], h.v_norms[:, coded : coded + e] = norms[0], norms[1]
        st.nw = exact_k.shape[1] - e
        st.wk[:, : st.nw] = exact_k[:, e:]
        if not self.values_in_keys:
            st.wv[:, : st.nw] = exact_v[:, e:]

    def end(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            seq = self.seqs[sid]
            seq.length += n
            seq.coded = max(seq.coded, seq.length - self.window)

    # -- accounting ------------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        """A coded token: packed words and a float16 norm per head, for keys (and values)."""
        per = self.num_kv_heads * (self.quantizers[0].words * 4 + NORM_DTYPE.itemsize)
        return self.num_layers * per * (1 if self.values_in_keys else 2)

    def nbytes(self) -> int:
        total = 0
        for seq in self.seqs.values():
            for st in seq.layers:
                h = st.hist
                seen = set()  # values_in_keys: value codes alias the key codes
                for t in (h.k_codes, h.k_norms, h.v_codes, h.v_norms, st.wk, st.wv):
                    if t.numel() and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel() * t.element_size()
        return total
