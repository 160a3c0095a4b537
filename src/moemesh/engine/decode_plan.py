"""One decode token of one sequence with the attention blocks as pre-bound C calls (the default path).

A decode step of a small model is dispatch-bound: the profile of SmolLM2's eager step (py-spy, 300
tokens) put ~45% of the main thread in Python and torch dispatch, most of it in the attention block
(a matmul, a split, views, two rotary calls, the cache's bookkeeping, another matmul and an add, each
checking its arguments and allocating its output). Here each layer's attention block is planned once:
the C kernels the eager modules call (quant/decode_kernels.c: RMSNorm, rotary, attend_one; the int4
matmul of quant/int4_native), bound to preallocated buffers and called with the same arguments, so a
step is the same arithmetic as ``Transformer.forward`` bit for bit (tests/test_decode_plan.py) without
its per-op overhead. Projections may be int4 or block-format (a GGUF's K-quants, MXFP4: BlockLinear's bk_matmul call);
layers the plan does not cover (other attention kinds, other weights, partial rotary) run their modules'
own forward; projection biases (gpt-oss) are added as the linear adds them. FFN blocks get their norm as
a C call and, when dense int4 gated MLPs or resident int4 experts behind a top-k softmax router or
gpt-oss's (top-k logits, then a softmax), their one fused kernel call (after the router's own C call; the
experts' act and biases ride along as int4_experts.Epilogue); experts behind any other provider (block
formats, lazy, remote) get the router's C call and then their provider's ``run``; other FFNs run their
forward on the normed row. Residuals are added in place.
"""
from __future__ import annotations

import ctypes

import torch

from ..batch import BatchLayout
from ..experts.provider import ResidentExperts
from ..kvcache.base import KVCache
from ..kvcache.dense import DenseKVCache
from ..layers.attention import Attention
from ..layers.gpt_oss_moe import LogitTopKRouter
from ..layers.mlp import GatedMLP
from ..layers.moe import MoEBlock
from ..layers.norm import RMSNorm
from ..layers.router import TopKRouter
from ..models.transformer import DecoderLayer, Transformer
from ..quant import blocks_native, decode_kernels, int4_native
from ..quant.blocks import BlockLinear
from ..quant.qlinear import QuantLinear
from .decode_step import StepTable, route


def _int4(lin: object) -> bool:
    return (isinstance(lin, QuantLinear) and lin.mode == "int4" and lin.native_int4() is not None
            and lin.dequant_min_m > 1 and (lin.bias is None or (lin.bias.dtype == torch.float32
                                                                and lin.bias.is_contiguous())))


def _block(lin: object) -> bool:
    return isinstance(lin, BlockLinear) and blocks_native.load_native() is not None


def plannable(layer: DecoderLayer, head_dim_rotary: int) -> bool:
    """Whether ``layer``'s attention block runs as planned C calls (else its module's forward)."""
    a = layer.attn
    return (type(a) is Attention and not a.output_gate and a.clip_qkv is None and a.qk_norm in (None, "head")
            and isinstance(layer.attn_norm, RMSNorm) and all(_int4(w) or _block(w) for w in (a.qkv, a.o_proj))
            and head_dim_rotary == a.head_dim and (a.qk_norm is None or (isinstance(a.q_norm, RMSNorm)
                                                                       and isinstance(a.k_norm, RMSNorm))))


class _Matmul:
    """One int4 QuantLinear on one row: x [1, K] -> out [1, N_pad] (int4_native.int4_matmul's call, then
    the bias on the first N entries: QuantLinear.forward's torch.add)."""

    def __init__(self, lin: QuantLinear, x: torch.Tensor, dk: ctypes.CDLL) -> None:
        self.lin, self.x, self.dk = lin, x, dk  # dk: the decode kernels (dk_add)
        self.lib, self.k, self.n_pad = lin.native_int4(), lin.in_features, lin.qweight.shape[0]
        self.out = torch.empty(1, self.n_pad)  # [1, N_pad]

    def __call__(self, threads: int) -> None:
        lin = self.lin  # (the weight's pointers and format read at each call: loading may move or re-lay them)
        if self.lib.i4_matmul(self.x.data_ptr(), 0, 1, self.k, lin.qweight.data_ptr(), lin.int4_scales().data_ptr(),
                              lin.kernel_fmt(), self.n_pad, self.out.data_ptr(), threads):
            raise ValueError(f"int4_matmul: kernel rejected K={self.k}, N={self.n_pad}")
        if lin.bias is not None:
            self.dk.dk_add(self.out.data_ptr(), lin.bias.data_ptr(), lin.out_features)


class _BlockMatmul:
    """One block-format linear on one row: x [1, K] -> out [1, N] (BlockLinear.forward's bk_matmul call,
    its bias added by the kernel)."""

    def __init__(self, lin: BlockLinear, x: torch.Tensor) -> None:
        self.lin, self.x, self.lib = lin, x, blocks_native.load_native()
        self.qtype = blocks_native.TYPE_IDS[lin.qtype]
        self.out = torch.empty(1, lin.out_features)  # [1, N]

    def __call__(self, threads: int) -> None:
        lin = self.lin
        rc = self.lib.bk_matmul(self.qtype, self.x.data_ptr(), 1, lin.in_features, lin.raw.data_ptr(),
                                lin.raw.stride(0), lin.out_features, None if lin.bias is None else lin.bias.data_ptr(),
                                self.out.data_ptr(), threads)
        if rc:
            blocks_native.check_rc(rc, f"{lin.qtype} matmul [1, {lin.in_features}] x [{lin.out_features}, {lin.in_features}]")


def _matmul(lin: QuantLinear | BlockLinear, x: torch.Tensor, dk: ctypes.CDLL) -> _Matmul | _BlockMatmul:
    return _BlockMatmul(lin, x) if isinstance(lin, BlockLinear) else _Matmul(lin, x, dk)


class AttentionPlan:
    """x [1, D] -> x + attention(norm(x)) for one token of one sequence, as the eager modules compute it
    (the sum written into x: the step's row, which nothing else holds)."""

    def __init__(self, layer: DecoderLayer, index: int, lib: ctypes.CDLL) -> None:
        a: Attention = layer.attn  # type: ignore[assignment]
        self.lib, self.index, self.attn = lib, index, a
        d = a.qkv.in_features
        hq, hkv, dh = a.num_heads, a.num_kv_heads, a.head_dim
        self.norm_w, self.eps = layer.attn_norm.weight, layer.attn_norm.eps
        self.h = torch.empty(1, d)  # [1, D] the normed input
        self.qkv = _matmul(a.qkv, self.h, lib)  # -> [1, (Hq + 2 Hkv) Dh (+ pad)]
        buf = self.qkv.out
        self.q, self.k, self.v = buf[0, : hq * dh], buf[0, hq * dh : (hq + hkv) * dh], buf[0, (hq + hkv) * dh :]
        if a.qk_norm == "head":  # normed copies (RMSNorm's output is a new tensor in the eager path too)
            self.q, self.k = torch.empty(hq * dh), torch.empty(hkv * dh)
        self.out = torch.empty(1, hq, dh)  # [1, Hq, Dh] attention output
        self.o = _matmul(a.o_proj, self.out, lib)  # -> [1, D (+ pad)]
        self.int4 = isinstance(self.qkv, _Matmul) and isinstance(self.o, _Matmul)  # what the one-call table takes
        self.d, self.hq, self.hkv, self.dh = d, hq, hkv, dh
        self.sinks = None if a.sinks is None else a.sinks.data_ptr()

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, dv: int, pos: int, threads: int) -> torch.Tensor:
        lib, a, hq, hkv, dh = self.lib, self.attn, self.hq, self.hkv, self.dh
        lib.dk_rms_norm(x.data_ptr(), 1, self.d, self.d, self.norm_w.data_ptr(), self.eps, self.h.data_ptr(), self.d)
        self.qkv(threads)
        raw = self.qkv.out[0]
        if a.qk_norm == "head":  # per head, over Dh (rows of the projection's q and k parts)
            lib.dk_rms_norm(raw.data_ptr(), hq, dh, dh, a.q_norm.weight.data_ptr(), a.q_norm.eps, self.q.data_ptr(), dh)
            lib.dk_rms_norm(raw[hq * dh :].data_ptr(), hkv, dh, dh, a.k_norm.weight.data_ptr(), a.k_norm.eps,
                            self.k.data_ptr(), dh)
        lib.dk_rope(self.q.data_ptr(), 1, hq, dh, hq * dh, dh, cos.data_ptr(), sin.data_ptr())
        lib.dk_rope(self.k.data_ptr(), 1, hkv, dh, hkv * dh, dh, cos.data_ptr(), sin.data_ptr())
        lo = 0 if a.window is None else max(0, pos + 1 - a.window)
        rc = lib.dk_attend_one(self.q.data_ptr(), hq, self.k.data_ptr(), dh, self.v.data_ptr(), dh, keys.data_ptr(),
                               values.data_ptr(), hkv, keys.shape[1], dh, dv, values.stride(1), pos, lo, pos + 1,
                               a.scale, self.sinks, self.out.data_ptr(), threads)
        if rc:
            raise ValueError(f"attend_one: bad shapes at layer {self.index}, pos {pos}")
        self.o(threads)
        lib.dk_add(x.data_ptr(), self.o.out.data_ptr(), self.d)  # the residual, in place (x is the step's own row)
        return x


class FfnPlan:
    """x [1, D] -> x + ffn(norm(x)) (into x, as AttentionPlan): the norm as a C call into a preallocated row,
    then a dense int4 SwiGLU's one fused call (GatedMLP.forward's decode path) or resident int4 experts'
    (ResidentExperts.run's, after the router's C call), any other FFN by its forward."""

    def __init__(self, layer: DecoderLayer, lib: ctypes.CDLL) -> None:
        self.lib, self.ffn = lib, layer.ffn
        self.norm_w, self.eps = layer.ffn_norm.weight, layer.ffn_norm.eps
        self.d = self.norm_w.shape[0]
        self.h = torch.empty(1, self.d)  # [1, D]
        self.out = torch.empty(1, self.d)  # [1, D] a MoE layer's mixed experts
        ffn = layer.ffn
        # resident int4 experts behind a top-k softmax router (or gpt-oss's): ResidentExperts.run's one-call path
        self.moe = (isinstance(ffn, MoEBlock) and type(ffn.router) in (TopKRouter, LogitTopKRouter) and ffn.shared is None
                    and type(ffn.provider) is ResidentExperts and not ffn.provider.reference
                    and ffn.provider._decode_table(ffn.layer) is not None)
        self.mlp = isinstance(ffn, GatedMLP) and ffn.fused_int4() is not None
        # experts behind any other provider (block formats, lazy, remote): the router's C call, then the provider
        self.routed = (not self.moe and isinstance(ffn, MoEBlock) and type(ffn.router) in (TopKRouter, LogitTopKRouter))
        if self.moe or self.routed:  # the router's C call (TopKRouter.forward's) into preallocated picks
            k = ffn.router.top_k
            self.ids, self.w = torch.empty(1, k, dtype=torch.int64), torch.empty(1, k)  # [1, A], [1, A]
        if self.mlp:
            self.y = torch.empty(1, ffn._kernel_key[1][0])  # [1, D_pad]

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        # (pointer tables are looked up at each call, as the modules do: loading may rebuild them)
        self.lib.dk_rms_norm(x.data_ptr(), 1, self.d, self.d, self.norm_w.data_ptr(), self.eps, self.h.data_ptr(),
                             self.d)
        ffn = self.ffn
        if self.moe:
            r, ids, w = ffn.router, self.ids, self.w
            if route(self.lib, r, self.h, ids, w, threads):
                ids, w = r(self.h)  # (a shape the kernel declines: the module's own forward)
            lib, t, inter, gu_pad, dn_pad, fmt, epi = ffn.provider._decode_table(ffn.layer)
            rc = lib.i4_moe_decode(self.h.data_ptr(), self.d, inter, ids.shape[1], ids.data_ptr(), w.data_ptr(),
                                   t.data_ptr(), t.shape[0], gu_pad, dn_pad, fmt, epi and epi.ptr, self.out.data_ptr(),
                                   threads)
            if rc:
                raise ValueError(f"moe_decode: kernel rejected D={self.d}, I={inter}, ids {ids.tolist()}")
            self.lib.dk_add(x.data_ptr(), self.out.data_ptr(), self.d)
            return x
        if self.routed:  # MoEBlock.forward's one-block path after the router's C call
            r, ids, w = ffn.router, self.ids, self.w
            if route(self.lib, r, self.h, ids, w, threads):
                ids, w = r(self.h)
            out = ffn._add_shared(self.h, ffn.provider.run(ffn.layer, self.h, ids, w))  # [1, D]
            out = out if out.dtype == torch.float32 and out.is_contiguous() else out.float().contiguous()
            self.lib.dk_add(x.data_ptr(), out.data_ptr(), self.d)
            return x
        if not self.mlp:
            return x + ffn(self.h)
        lib = ffn.fused_int4()
        gu_q, dn_q, fmt, _ = ffn._kernel_key
        base, epi = ffn._kernel_table.data_ptr(), ffn._epilogue  # int64 [4, 1]: gate_up q, scales, down q, scales
        if lib.i4_experts_ffn(self.h.data_ptr(), self.d, ffn.down.in_features, 1, base, base + 8, gu_q[0], base + 16,
                              base + 24, dn_q[0], fmt, epi and epi.ptr, self.y.data_ptr(), threads):
            raise ValueError(f"experts_ffn: kernel rejected D={self.d}")
        self.lib.dk_add(x.data_ptr(), self.y.data_ptr(), self.d)
        return x


class PlannedDecode:
    """``maybe_step``: logits [1, V] of one sequence's one decode token, or None where the plan does not
    apply (several sequences, prefill, a cache other than the dense fp32 one, no native kernels).
    When every layer is planned, a token's layers run as one C call (decode_step.StepTable) unless
    ``one_call`` is False (the per-layer loop below: the same calls, from Python)."""

    def __init__(self, model: Transformer, one_call: bool = True) -> None:
        self.model = model
        self.lib = decode_kernels.load()
        rotary = model.rope.cos_sin(torch.zeros(1, dtype=torch.long))[0].shape[-1]
        self.plans: list[AttentionPlan | None] = []
        if self.lib is not None and int4_native.load_native() is not None:
            self.plans = [AttentionPlan(layer, i, self.lib) if plannable(layer, rotary) else None
                          for i, layer in enumerate(model.layers)]
        self.ffns = [FfnPlan(layer, self.lib) if plan is not None and isinstance(layer.ffn_norm, RMSNorm) else None
                     for layer, plan in zip(model.layers, self.plans)]
        self.active = any(p is not None for p in self.plans)
        d = model.embed.shape[1] if self.active else 0
        self.table = StepTable.build(self.plans, self.ffns, self.lib, d) if self.active and one_call else None

    def maybe_step(self, token_chunks: list[list[int]], in_prefill: list[bool], seq_ids: list[int],
                   cache: KVCache) -> torch.Tensor | None:
        if (not self.active or any(in_prefill) or any(len(c) != 1 for c in token_chunks)
                or type(cache) is not DenseKVCache or cache.dtype != torch.float32):
            return None
        if len(seq_ids) == 1:
            return self.step(token_chunks[0][0], seq_ids[0], cache)
        return None if self.table is None else self.step_batch([c[0] for c in token_chunks], seq_ids, cache)

    @torch.inference_mode()
    def step(self, token: int, seq_id: int, cache: DenseKVCache) -> torch.Tensor:
        model, seq = self.model, cache.seqs[seq_id]
        pos = seq.length
        batch = BatchLayout([seq_id], [1])
        cache.begin(batch)
        positions = torch.tensor([pos])
        x = model.embed[torch.tensor([token])].float().contiguous()  # [1, D] a new row: the plans add into it
        cos, sin = model.rope.cos_sin(positions)  # [1, 1, Dh]
        threads = torch.get_num_threads()
        if self.table is not None:
            self.table.run(x, cos, sin, cache, seq_id, pos, threads)
            cache.end(batch)
            return model.logits(x)  # [1, V]
        for layer, plan, ffn in zip(model.layers, self.plans, self.ffns):
            if plan is None:
                x = layer.attention_block(x, cos, sin, cache, batch)
            else:
                keys = seq.keys[plan.attn.layer]  # the layer's index in the cache (a mesh stage's own numbering)
                values = keys if cache.values_in_keys else seq.values[plan.attn.layer]
                x = plan(x, cos, sin, keys, values, cache.value_dim, pos, threads)
            x = layer.ffn_block(x) if ffn is None else ffn(x, threads)
        cache.end(batch)
        return model.logits(x)  # [1, V]

    @torch.inference_mode()
    def step_batch(self, tokens: list[int], seq_ids: list[int], cache: DenseKVCache) -> torch.Tensor:
        """One decode token of each sequence (a batched step) through the table: logits [B, V], each row
        the modules' batched forward's bits, which are its bits alone."""
        model = self.model
        positions = [cache.seqs[s].length for s in seq_ids]
        batch = BatchLayout(list(seq_ids), [1] * len(seq_ids))
        cache.begin(batch)
        x = model.embed[torch.tensor(tokens)].float().contiguous()  # [B, D]
        cos, sin = model.rope.cos_sin(torch.tensor(positions))  # [B, 1, Dh]
        self.table.run_batch(x, cos, sin, cache, seq_ids, positions, torch.get_num_threads())  # type: ignore[union-attr]
        cache.end(batch)
        return model.logits(x)  # [B, V]
