"""TurboQuant KV cache: old tokens as packed Lloyd-Max codes + norms, recent ones exact.

Per sequence and layer, tokens [0, coded) are stored as codes (``CodedHistory``: uint8 bit-packed
codes of the rotated unit vector, float16 norm) and tokens [coded, length) - at most ``window``
of them, the most recent - in full precision. A forward pass sees its own chunk in full
precision too; after it, tokens that fell out of the window are encoded (each exactly once).
Attention reads the codes directly (``attend_codes``); ``mode="dequant"`` runs the plain
dequantize-then-attend reference instead. Each layer has its own rotation (seed + layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layers.batch import BatchLayout
from .base import KVCache
from .quantizer import NORM_DTYPE, NORM_MAX, TurboQuantizer
from .tq_attention import CodedHistory, attend_codes, attend_dequant
from .tq_native import boundary_descriptors, coord_descriptors, decode_attend, load_native, pack_into, padded_table

BITS_CHOICES = (2.0, 2.5, 3.0, 3.5, 4.0)  # the rates the CLI offers; the quantizer takes more
DEFAULT_WINDOW = 32
MIN_CAPACITY = 64
MODES = ("codes", "dequant")


@dataclass
class _LayerState:
    hist: CodedHistory
    win_k: torch.Tensor  # [Hkv, length - coded, Dh] float32, positions [coded, length)
    win_v: torch.Tensor


@dataclass
class _Seq:
    length: int = 0
    coded: int = 0  # tokens [0, coded) are codes; invariant: length - coded == min(length, window)
    layers: list[_LayerState] = field(default_factory=list)


class TurboQuantKVCache(KVCache):
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
    ) -> None:
        """mode: "codes" (attention from codes) or "dequant" (reference). native: use the C
        decode kernel for one-token steps (None: when it can be built; False: never)."""
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
        self.table = padded_table(first.table)  # same centroids in every layer
        usable = mode == "codes" and self.table is not None
        self.lib = load_native() if native is not False and usable else None
        if native and self.lib is None:
            raise RuntimeError("the native TurboQuant kernel is unavailable (see tq_native.py)")
        self.desc = coord_descriptors(first.layout, first.table_offsets)
        self.bounds, self.bdesc = boundary_descriptors(first.sizes, [cb.boundaries for cb in first.codebooks])

    # -- sequences -------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already in the cache")
        empty = torch.empty(self.num_kv_heads, 0, self.head_dim)
        self.seqs[seq_id] = _Seq(layers=[_LayerState(self._history(0), empty, empty) for _ in range(self.num_layers)])

    def free_sequence(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    def _history(self, cap: int) -> CodedHistory:
        h, w = self.num_kv_heads, self.quantizers[0].words
        return CodedHistory(
            torch.zeros(h, w, cap, dtype=torch.int32), torch.zeros(h, cap, dtype=NORM_DTYPE),
            torch.zeros(h, w, cap, dtype=torch.int32), torch.zeros(h, cap, dtype=NORM_DTYPE),
        )

    # -- forward protocol ------------------------------------------------------------------
    def begin(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            seq = self.seqs[sid]
            self._reserve(seq, max(seq.coded, seq.length + n - self.window))

    def _reserve(self, seq: _Seq, needed: int) -> None:
        cap = seq.layers[0].hist.k_norms.shape[1]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, MIN_CAPACITY)  # doubling keeps appends amortised O(1)
        for st in seq.layers:
            old, st.hist = st.hist, self._history(new_cap)
            for name in ("k_codes", "v_codes"):
                getattr(st.hist, name)[..., : seq.coded] = getattr(old, name)[..., : seq.coded]
            for name in ("k_norms", "v_norms"):
                getattr(st.hist, name)[:, : seq.coded] = getattr(old, name)[:, : seq.coded]

    def attend(self, layer, q, k, v, batch, scale, window=None):
        # q: [T, Hq, Dh], k/v: [T, Hkv, Dh] -> [T, Hq, Dh]
        tq = self.quantizers[layer]
        run = attend_codes if self.mode == "codes" else attend_dequant
        out = torch.empty_like(q)
        for sid, off, n in zip(batch.seq_ids, batch.offsets, batch.query_lens):
            seq = self.seqs[sid]
            st = seq.layers[layer]
            exact_k = torch.cat([st.win_k, k[off : off + n].transpose(0, 1).float()], dim=1)  # [Hkv, W', Dh]
            exact_v = torch.cat([st.win_v, v[off : off + n].transpose(0, 1).float()], dim=1)
            if n == 1 and self.lib is not None:
                out[off] = self._native_step(tq, q[off] * scale, st.hist, seq.coded, exact_k, exact_v, seq.length, window)
            else:
                out[off : off + n] = run(tq, q[off : off + n], st.hist, seq.coded, exact_k, exact_v, seq.length, scale, window)
            self._evict(tq, st, seq.coded, exact_k, exact_v)
        return out

    def _native_step(self, tq, q, hist, coded, exact_k, exact_v, start, window) -> torch.Tensor:
        """One query token [Hq, Dh] (scaled) through the C kernel -> [Hq, Dh]."""
        lo = 0 if window is None else max(0, start - window + 1)
        nc, e0 = max(0, coded - lo), max(lo, coded) - coded
        ek, ev = exact_k[:, e0:].contiguous(), exact_v[:, e0:].contiguous()
        return decode_attend(
            self.lib, q, tq.rt, hist.k_codes, hist.v_codes, min(lo, coded), nc, hist.k_norms, hist.v_norms,
            ek, ev, self.table, self.desc,
        )

    def _evict(self, tq: TurboQuantizer, st: _LayerState, coded: int, exact_k: torch.Tensor, exact_v: torch.Tensor) -> None:
        """Encode the tokens that left the window; keep the last ``window`` exact."""
        e = max(0, exact_k.shape[1] - self.window)
        if e:
            h = st.hist
            x = torch.stack([exact_k[:, :e], exact_v[:, :e]])  # [2, Hkv, e, Dh]
            if self.lib is not None:
                norms, unit = tq.normalize_rotate(x)
                pack_into(self.lib, unit.contiguous(), self.bounds, self.bdesc, self.desc, h.k_codes, h.v_codes, coded)
                norms = norms.clamp(max=NORM_MAX).to(NORM_DTYPE)  # [2, Hkv, e]
            else:
                words, norms = tq.encode(x)  # [2, Hkv, e, words], [2, Hkv, e]
                h.k_codes[:, :, coded : coded + e] = words[0].transpose(1, 2)
                h.v_codes[:, :, coded : coded + e] = words[1].transpose(1, 2)
            h.k_norms[:, coded : coded + e], h.v_norms[:, coded : coded + e] = norms[0], norms[1]
        st.win_k, st.win_v = exact_k[:, e:].clone(), exact_v[:, e:].clone()  # clone: drop the chunk's storage

    def end(self, batch: BatchLayout) -> None:
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            seq = self.seqs[sid]
            seq.length += n
            seq.coded = max(seq.coded, seq.length - self.window)

    # -- accounting ------------------------------------------------------------------------
    def nbytes(self) -> int:
        total = 0
        for seq in self.seqs.values():
            for st in seq.layers:
                h = st.hist
                for t in (h.k_codes, h.k_norms, h.v_codes, h.v_norms, st.win_k, st.win_v):
                    total += t.numel() * t.element_size()
        return total
