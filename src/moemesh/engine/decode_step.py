"""A planned decode token's layers as one C call (quant/decode_step.c: ``dk_decode_layers``).

decode_plan.PlannedDecode binds each layer's blocks to pre-bound C calls; this packs the same calls'
arguments into a table of ``Layer`` structs once, so a token's layers run from one C loop: the same
kernels with the same arguments in the same order (the same bits: tests/test_decode_plan.py) without
~12 ctypes calls and their Python per layer. It applies when every layer is planned (attention as
AttentionPlan, FFN as FfnPlan's fused MoE or MLP call, whose router takes the shape); otherwise
PlannedDecode keeps its per-layer loop.

The table holds raw addresses of weights and pointer tables: they are placed at load
(loading/placement.py) before an Engine, and so this table, exists, and the table keeps a reference
to each tensor it points into. The KV buffers change as a sequence grows (kvcache/dense.py replaces
every layer's buffer at once), so their addresses are read again whenever the first one is another.
"""
from __future__ import annotations

import ctypes
import weakref
from typing import Any

import torch

from ..kvcache.dense import DenseKVCache
from ..layers.gpt_oss_moe import LogitTopKRouter
from ..layers.router import TopKRouter

AttentionPlan = FfnPlan = Any  # decode_plan's classes (which import this module): what the table reads of them

P = ctypes.c_void_p
I64 = ctypes.c_int64
F32 = ctypes.c_float
FFN_MOE, FFN_MLP = 1, 2
ROUTER_SOFTMAX, ROUTER_LOGITS = 0, 1  # TopKRouter, gpt-oss's LogitTopKRouter


class Layer(ctypes.Structure):
    """decode_step.c's dk_layer, field for field."""
    _fields_ = [
        ("qkv_fn", P), ("o_fn", P), ("ffn_fn", P), ("ffn_batch_fn", P),
        ("attn_norm", P), ("q_norm", P), ("k_norm", P), ("sinks", P), ("ffn_norm", P), ("router", P),
        ("qkv_b", P), ("o_b", P), ("router_b", P), ("epi", P),
        ("qkv_q", P), ("o_q", P), ("qkv_s", P), ("o_s", P), ("table", P),
        ("qkv_npad", I64), ("o_npad", I64), ("qkv_fmt", I64), ("o_fmt", I64),
        ("hq", I64), ("hkv", I64), ("dh", I64), ("window", I64),
        ("ffn_kind", I64), ("router_kind", I64), ("n_exp", I64), ("top_k", I64), ("norm_topk", I64), ("inter", I64),
        ("gu_npad", I64),
        ("dn_npad", I64), ("ffn_fmt", I64),
        ("attn_eps", F32), ("q_eps", F32), ("k_eps", F32), ("scale", F32), ("ffn_eps", F32), ("pad_", F32),
    ]


def _fn(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), P).value or 0


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class StepTable:
    """Every layer of a fully planned model as dk_layer structs; ``run`` computes one token's layers."""

    def __init__(self, plans: list[AttentionPlan], ffns: list[FfnPlan], lib: ctypes.CDLL, offset: int = 0) -> None:
        self.lib, self.plans = lib, plans
        self.offset = offset  # the cache numbers its layers from here (a mesh stage's range: decode_range.py)
        self.keep: list[object] = []  # every tensor the table points into (kept alive with it)
        self.layers = (Layer * len(plans))(*[self._layer(p, f) for p, f in zip(plans, ffns)])
        self.addr = ctypes.addressof(self.layers)
        self.kv = torch.zeros(len(plans), 4, dtype=torch.int64)  # [L, 4] keys, values, capacity, values' row stride
        self._first: weakref.ref | None = None  # the KV buffer the addresses in ``kv`` were read from
        self._rows: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # batched steps: seq id -> (first buffer, [L, 3])

    @staticmethod
    def build(plans: list[AttentionPlan], ffns: list[FfnPlan], lib: ctypes.CDLL,
              d: int, offset: int = 0) -> StepTable | None:
        """The table when every layer is planned end to end and the library has the step, else None."""
        if not plans or not hasattr(lib, "dk_decode_layers"):
            return None
        for p, f in zip(plans, ffns):
            if p is None or f is None or not p.int4 or not (f.moe or f.mlp) or p.attn.o_proj.in_features != p.hq * p.dh:
                return None
            if f.mlp and f.ffn._epilogue is not None:  # (a dense MLP's act and biases: the per-layer loop)
                return None
            if f.moe and not _router_takes(lib, f, d):
                return None
        return StepTable(plans, ffns, lib, offset)  # type: ignore[arg-type]

    def _layer(self, p: AttentionPlan, f: FfnPlan) -> Layer:
        a, qkv, o = p.attn, p.qkv.lin, p.o.lin
        head_norm = a.qk_norm == "head"
        held = [p.norm_w, qkv.qweight, qkv.int4_scales(), o.qweight, o.int4_scales(), f.norm_w, a.sinks, qkv.bias,
                o.bias]
        L = Layer(qkv_fn=_fn(qkv.native_int4(), "i4_matmul"), o_fn=_fn(o.native_int4(), "i4_matmul"),
                  attn_norm=_ptr(p.norm_w), q_norm=_ptr(a.q_norm.weight) if head_norm else None,
                  k_norm=_ptr(a.k_norm.weight) if head_norm else None, sinks=_ptr(a.sinks), ffn_norm=_ptr(f.norm_w),
                  qkv_q=_ptr(qkv.qweight), o_q=_ptr(o.qweight), qkv_s=_ptr(qkv.int4_scales()),
                  o_s=_ptr(o.int4_scales()), qkv_b=_ptr(qkv.bias), o_b=_ptr(o.bias),
                  qkv_npad=qkv.qweight.shape[0], o_npad=o.qweight.shape[0],
                  qkv_fmt=qkv.kernel_fmt(), o_fmt=o.kernel_fmt(), hq=p.hq, hkv=p.hkv, dh=p.dh,
                  window=a.window or 0, attn_eps=p.eps, q_eps=a.q_norm.eps if head_norm else 0.0,
                  k_eps=a.k_norm.eps if head_norm else 0.0, scale=a.scale, ffn_eps=f.eps)
        if head_norm:
            held += [a.q_norm.weight, a.k_norm.weight]
        ffn = f.ffn
        if f.moe:
            r = ffn.router
            lib, table, inter, gu_pad, dn_pad, fmt, epi = ffn.provider._decode_table(ffn.layer)
            L.ffn_kind, L.ffn_fn, L.router, L.table = FFN_MOE, _fn(lib, "i4_moe_decode"), r.weight.data_ptr(), table.data_ptr()
            L.ffn_batch_fn = _fn(lib, "i4_moe_batch")
            logits = type(r) is LogitTopKRouter  # gpt-oss's router: biased logits, top k, softmax
            L.router_kind, L.router_b = (ROUTER_LOGITS, r.bias.data_ptr()) if logits else (ROUTER_SOFTMAX, None)
            L.n_exp, L.top_k, L.norm_topk = r.weight.shape[0], r.top_k, 0 if logits else int(r.norm_topk_prob)
            L.inter, L.gu_npad, L.dn_npad, L.ffn_fmt = inter, gu_pad, dn_pad, fmt
            L.epi = None if epi is None else epi.ptr
            held += [r.weight, table, r.bias if logits else None, epi]
        else:
            lib = ffn.fused_int4()
            gu_q, dn_q, fmt, _ = ffn._kernel_key
            L.ffn_kind, L.ffn_fn, L.table = FFN_MLP, _fn(lib, "i4_experts_ffn"), ffn._kernel_table.data_ptr()
            L.ffn_batch_fn = _fn(lib, "i4_silu_mul_rows")  # (its batched gate_up and down: i4_matmul, as qkv_fn)
            L.inter, L.gu_npad, L.dn_npad, L.ffn_fmt = ffn.down.in_features, gu_q[0], dn_q[0], fmt
            held += [ffn._kernel_table]
        self.keep += [t for t in held if t is not None]
        return L

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: DenseKVCache, seq_id: int, pos: int,
            threads: int) -> None:
        """x fp32 [1, D] (the token's embedding; its last hidden state on return), cos/sin [1, 1, Dh]:
        every layer for the token at ``pos`` of ``seq_id`` (whose buffers cache.begin reserved)."""
        seq = self.kv_of(cache, seq_id)
        rc = self.lib.dk_decode_layers(x.data_ptr(), x.shape[1], self.addr, len(self.plans), self.kv.data_ptr(),
                                       cache.value_dim, cos.data_ptr(), sin.data_ptr(), pos, threads)
        if rc:
            what = {1: "the qkv matmul", 2: "attention", 3: "the o matmul", 4: "the router", 5: "the FFN kernel"}
            raise ValueError("decode step: out of memory" if rc < 0 else
                             f"decode step: {what.get((rc - 1) % 16, '?')} failed at layer {(rc - 1) // 16}, "
                             f"position {pos} (sequence of {seq.length} tokens)")

    def kv_of(self, cache: DenseKVCache, seq_id: int):
        """The sequence, with ``kv`` holding its buffers' addresses (read again when they moved)."""
        seq = cache.seqs[seq_id]
        first = seq.keys[self.plans[0].attn.layer - self.offset]
        if self._first is None or self._first() is not first:
            self.kv.copy_(self._addresses(cache, seq, 4))
            self._first = weakref.ref(first)
        return seq

    def _addresses(self, cache: DenseKVCache, seq, cols: int) -> torch.Tensor:
        """int64 [L, cols]: per layer the keys and values addresses, the capacity (and the values' row stride)."""
        rows = []
        for p in self.plans:
            keys = seq.keys[p.attn.layer - self.offset]
            values = keys if cache.values_in_keys else seq.values[p.attn.layer - self.offset]
            rows.append([keys.data_ptr(), values.data_ptr(), keys.shape[1], values.stride(1)][:cols])
        return torch.tensor(rows, dtype=torch.int64)

    def run_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: DenseKVCache,
                  seq_ids: list[int], positions: list[int], threads: int) -> None:
        """x fp32 [B, D] (one token of each sequence; their last hidden states on return), cos/sin
        [B, 1, Dh]: every layer for the tokens at ``positions`` (buffers reserved by cache.begin)."""
        cols = []
        for sid in seq_ids:
            seq = cache.seqs[sid]
            first = seq.keys[self.plans[0].attn.layer - self.offset]
            got = self._rows.get(sid)
            if got is None or got[0]() is not first:
                got = (weakref.ref(first), self._addresses(cache, seq, 3))
                self._rows[sid] = got
            cols.append(got[1])
        if len(self._rows) > 4 * len(seq_ids) + 64:  # sequences that ended: their buffers are gone
            self._rows = {k: v for k, v in self._rows.items() if v[0]() is not None}
        kv = torch.stack(cols, dim=-1).contiguous()  # [L, 3, B]
        pos = torch.tensor(positions, dtype=torch.int64)
        p0 = self.plans[0]
        v_stride = p0.dh if cache.values_in_keys else cache.value_dim
        rc = self.lib.dk_decode_layers_batch(x.data_ptr(), x.shape[0], x.shape[1], self.addr, len(self.plans),
                                             kv.data_ptr(), cache.value_dim, v_stride, cos.data_ptr(), sin.data_ptr(),
                                             pos.data_ptr(), threads)
        if rc:
            what = {1: "the qkv matmul", 2: "attention", 3: "the o matmul", 4: "the router", 5: "the FFN kernels"}
            raise ValueError("batched decode step: out of memory" if rc < 0 else
                             f"batched decode step: {what.get((rc - 1) % 16, '?')} failed at layer {(rc - 1) // 16}, "
                             f"positions {positions}")


def route(lib: ctypes.CDLL, r: TopKRouter | LogitTopKRouter, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
          threads: int) -> int:
    """The router's C call (its module's forward's) on rows h [T, D] into ids int64 [T, A], w [T, A]: 0, or
    nonzero where the kernel declines the shape."""
    t, d = h.shape
    if type(r) is LogitTopKRouter:
        return lib.dk_router_logits_topk(h.data_ptr(), t, d, d, r.weight.data_ptr(), r.bias.data_ptr(),
                                         r.weight.shape[0], r.top_k, ids.data_ptr(), w.data_ptr(), threads)
    return lib.dk_router_topk(h.data_ptr(), t, d, d, r.weight.data_ptr(), r.weight.shape[0], r.top_k,
                              int(r.norm_topk_prob), ids.data_ptr(), w.data_ptr(), threads)


def _router_takes(lib: ctypes.CDLL, f: FfnPlan, d: int) -> bool:
    """Whether the router's C call takes this layer's shape (it declines some: then the plan's own
    fallback, the module, must run, which one C loop cannot)."""
    r = f.ffn.router
    ids, w = torch.empty(1, r.top_k, dtype=torch.int64), torch.empty(1, r.top_k)
    return route(lib, r, torch.zeros(1, d), ids, w, 1) == 0
