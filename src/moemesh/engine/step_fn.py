"""The compiled decode step as a plain function over explicit inputs (engine/compiled.py compiles it).

The function takes every weight as one flat list argument ``w`` (references to the model's tensors)
and reads the model's structure (modes, sizes, flags) from plain plan objects holding ints and
strings, so the graph's inputs are explicit: weights and KV buffers are passed in, never captured.
It mirrors, op for op, what the eager layers compute (see engine/compiled.py for the numerics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..experts.mixing import expert_table
from ..experts.provider import ResidentExperts
from ..layers.attention import Attention
from ..layers.head import OutputHead
from ..layers.mlp import ACTIVATIONS, GatedMLP
from ..layers.moe import MoEBlock
from ..layers.rope import apply_rope
from ..layers.router import TopKRouter
from ..models.transformer import Transformer
from ..quant import int4_ops
from ..quant.qlinear import QuantLinear


def unsupported_reason(model: Transformer) -> str | None:
    """Why ``model`` cannot use the compiled decode step, or None when it can."""
    for i, layer in enumerate(model.layers):
        ffn = layer.ffn
        if isinstance(ffn, MoEBlock):
            why = _moe_unsupported(ffn)
            if why:
                return f"layer {i}: {why}"
        elif not isinstance(ffn, GatedMLP):
            return f"layer {i} feed-forward is {type(ffn).__name__} (dense GatedMLP or resident int4 MoE layers compile)"
        if not isinstance(layer.attn, Attention):
            return f"layer {i} attention is {type(layer.attn).__name__}"
        if layer.attn.output_gate:
            return f"layer {i} attention has an output gate (Qwen3-Next / Qwen3.5)"
    if not isinstance(model.lm_head, OutputHead):
        return f"output head is {type(model.lm_head).__name__}"
    if getattr(model.rope, "attention_factor", 1.0) != 1.0:  # YaRN scales cos/sin; the step function does not
        return "scaled RoPE with an attention factor (YaRN) is not in the compiled step"
    return None


def _moe_unsupported(ffn: MoEBlock) -> str | None:
    if type(ffn.router) is not TopKRouter or ffn.shared is not None:
        return "MoE layer with a shared expert or a non-softmax router"
    if not isinstance(ffn.provider, ResidentExperts) or ffn.provider.reference:
        return f"experts behind {type(ffn.provider).__name__} (only resident experts compile)"
    if expert_table(ffn.provider.experts[ffn.layer]) is None:
        return "experts are not int4 SwiGLUs the fused C kernel reads"
    return None


# ---------------------------------------------------------------- the step as a plain function
# The compiled function takes every weight as one flat list argument ``w`` (references to the
# model's tensors) and reads the model's structure (modes, sizes, flags) from plain objects
# holding ints and strings, so the graph's inputs are explicit: weights and KV buffers are passed
# in, never captured. (The module methods themselves are not traceable as they are: QuantLinear
# checks data_ptr alignment in Python.)


class LinearPlan:
    """One QuantLinear: its mode and sizes, and where its tensors sit in the weight list."""

    def __init__(self, ql: QuantLinear, w: list[torch.Tensor]) -> None:
        self.mode, self.out_features, self.group_size = ql.mode, ql.out_features, ql.group_size
        # big int4 linears: moemesh's kernel as a custom op (the eager layer's bits for the same input);
        # the others: torch's kernel, a symmetric layer's (scale, 0) pairs built once here
        self.native = (ql.mode == "int4" and ql.native_int4() is not None
                       and (ql.qweight.numel() >= int4_ops.NATIVE_LINEAR_MIN_BYTES or ql.scale_blocks))
        self.fmt = ql.kernel_fmt() if ql.mode == "int4" else 0
        if self.native:
            self.idx = (_add(w, ql.qweight), _add(w, ql.int4_scales()))
        elif ql.mode == "int4":
            self.idx = (_add(w, ql.qweight), _add(w, ql.torch_scales_and_zeros()))
        else:
            tensors = {"int8": ("qweight", "_ones", "scales"), "bf16": ("weight",), "fp32": ("weight",)}[ql.mode]
            self.idx = tuple(_add(w, getattr(ql, name)) for name in tensors)
        self.bias = None if ql.bias is None else _add(w, ql.bias)


class MoEPlan:
    """A resident int4 MoE layer: router weight and the experts' pointer table in the weight list."""

    def __init__(self, ffn: MoEBlock, w: list[torch.Tensor]) -> None:
        experts = ffn.provider.experts[ffn.layer]
        self.router, self.top_k, self.norm_topk = _add(w, ffn.router.weight), ffn.router.top_k, ffn.router.norm_topk_prob
        self.table = _add(w, expert_table(experts))
        e = experts[0]
        self.inter, self.gu_npad, self.dn_npad = e.down.in_features, e.gate_up.qweight.shape[0], e.down.qweight.shape[0]
        self.fmt = e.gate_up.kernel_fmt()  # expert_table checked every expert has it


class LayerPlan:
    def __init__(self, layer, w: list[torch.Tensor]) -> None:
        attn, ffn = layer.attn, layer.ffn
        self.attn_norm, self.attn_eps = _add(w, layer.attn_norm.weight), layer.attn_norm.eps
        self.ffn_norm, self.ffn_eps = _add(w, layer.ffn_norm.weight), layer.ffn_norm.eps
        self.qkv, self.o_proj = LinearPlan(attn.qkv, w), LinearPlan(attn.o_proj, w)
        self.moe = MoEPlan(ffn, w) if isinstance(ffn, MoEBlock) else None
        if self.moe is None:
            self.gate_up, self.down = LinearPlan(ffn.gate_up, w), LinearPlan(ffn.down, w)
            self.act = ffn.act_name
        self.hq, self.hkv, self.dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale, self.window, self.clip_qkv, self.qk_norm = attn.scale, attn.window, attn.clip_qkv, attn.qk_norm
        self.q_norm = self.k_norm = None
        if attn.qk_norm:
            self.q_norm, self.k_norm = _add(w, attn.q_norm.weight), _add(w, attn.k_norm.weight)
            self.qk_eps = attn.q_norm.eps


class StepPlan:
    """The model's structure for the step function plus ``weights``: references (never copies) to
    the model's tensors, in the order the plan's indices name them."""

    def __init__(self, model: Transformer, attn_impl: str = "bmm") -> None:
        w: list[torch.Tensor] = []
        self.embed = _add(w, model.embed)
        self.inv_freq = _add(w, model.rope.inv_freq)
        self.layers = [LayerPlan(layer, w) for layer in model.layers]
        self.norm, self.norm_eps = _add(w, model.norm.weight), model.norm.eps
        h = model.lm_head
        self.head_table = _add(w, h.weight)
        self.head_approx = None if h.approx is None else LinearPlan(h.approx, w)
        self.rescore = h.rescore
        self.attn_impl = attn_impl
        self.weights = w


def _add(w: list[torch.Tensor], t: torch.Tensor) -> int:
    w.append(t)
    return len(w) - 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def linear(p: LinearPlan, w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward for a few rows (M < dequant_min_m). x: [M, K] fp32 -> [M, N] fp32."""
    bias = None if p.bias is None else w[p.bias]
    if p.mode == "fp32":
        return F.linear(x, w[p.idx[0]], bias)
    if p.native:  # fp32 x straight into the C kernel, as QuantLinear.forward does
        y = torch.ops.moemesh.int4_linear(x, w[p.idx[0]], w[p.idx[1]], p.out_features, p.fmt)
        return y if bias is None else torch.add(y, bias)
    xb = x.to(torch.bfloat16)
    if p.mode == "int4":
        y = torch._weight_int4pack_mm_for_cpu(xb, w[p.idx[0]], p.group_size, w[p.idx[1]])[:, : p.out_features]
    elif p.mode == "int8":
        y = torch._weight_int8pack_mm(xb, w[p.idx[0]], w[p.idx[1]])
        scales = w[p.idx[2]]
        return torch.mul(y, scales) if bias is None else torch.addcmul(bias, y, scales)
    else:  # bf16
        y = F.linear(xb, w[p.idx[0]])
    return y.float() if bias is None else torch.add(y, bias)


def attention(p: LayerPlan, w: list[torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              pos: torch.Tensor, length, keys: torch.Tensor, values: torch.Tensor, impl: str) -> torch.Tensor:
    """Attention.forward + DenseKVCache.attend for one token. x: [1, D] (normed); keys/values:
    [Hkv, cap, Dh], written at ``length`` in place; returns [1, D]."""
    hq, hkv, dh = p.hq, p.hkv, p.dh
    q, k, v = linear(p.qkv, w, x).split([hq * dh, hkv * dh, hkv * dh], dim=-1)
    if p.qk_norm == "full":  # olmoe
        q, k = rms_norm(q, w[p.q_norm], p.qk_eps), rms_norm(k, w[p.k_norm], p.qk_eps)
    if p.clip_qkv is not None:
        q, k, v = (z.clamp(-p.clip_qkv, p.clip_qkv) for z in (q, k, v))
    q, k, v = q.view(1, hq, dh), k.view(1, hkv, dh), v.reshape(1, hkv, dh)
    if p.qk_norm == "head":  # qwen3
        q, k = rms_norm(q, w[p.q_norm], p.qk_eps), rms_norm(k, w[p.k_norm], p.qk_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys.index_copy_(1, pos, k.transpose(0, 1))  # [Hkv, 1, Dh] at column `length`, in place
    values.index_copy_(1, pos, v.transpose(0, 1))
    end = length + 1
    lo = 0 if p.window is None else torch.sym_max(0, end - p.window)
    ks, vs = keys[:, lo:end], values[:, lo:end]  # [Hkv, L, Dh]: the real length, no mask
    qg = q.view(hkv, hq // hkv, dh)  # [Hkv, G, Dh]
    if impl == "sdpa":  # one fused CPU attention kernel per layer (GQA without repeating K/V)
        out = F.scaled_dot_product_attention(q.view(1, hq, 1, dh), ks[None], vs[None], scale=p.scale,
                                             enable_gqa=True).reshape(1, hq * dh)
    elif impl == "bmm":
        probs = torch.softmax(torch.bmm(qg, ks.transpose(1, 2)) * p.scale, dim=-1)  # [Hkv, G, L]
        out = torch.bmm(probs, vs).reshape(1, hq * dh)
    else:  # elementwise products + sums: Inductor fuses them with the softmax, no extern GEMM calls
        scores = (qg[:, :, None, :] * ks[:, None, :, :]).sum(-1) * p.scale  # [Hkv, G, L]
        probs = torch.softmax(scores, dim=-1)
        out = (probs[..., None] * vs[:, None, :, :]).sum(-2).reshape(1, hq * dh)  # [Hkv, G, Dh]
    return linear(p.o_proj, w, out)


def mlp(p: LayerPlan, w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if p.moe is not None:  # TopKRouter in the graph, the experts in one custom op
        m = p.moe
        probs = F.softmax(F.linear(x, w[m.router]), dim=-1, dtype=torch.float32)  # [1, E]
        weights, ids = torch.topk(probs, m.top_k, dim=-1)
        if m.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return torch.ops.moemesh.moe_decode(x, ids, weights, w[m.table], m.inter, m.gu_npad, m.dn_npad, m.fmt)
    gate, up = linear(p.gate_up, w, x).chunk(2, dim=-1)  # [1, I] each
    return linear(p.down, w, ACTIVATIONS[p.act](gate) * up)


def head(plan: StepPlan, w: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """OutputHead.forward. x: [1, D] -> [1, V]."""
    table = w[plan.head_table]
    if plan.head_approx is None:
        return F.linear(x, table)
    logits = linear(plan.head_approx, w, x)  # [1, V]
    top = logits.topk(plan.rescore, dim=-1).indices  # [1, R]
    exact = torch.einsum("bd,brd->br", x, table[top].float())  # [1, R]
    return logits.scatter(-1, top, exact)


def make_step(plan: StepPlan):
    """The decode step over ``plan``: step(token, pos, keys, values, w) -> logits [1, V].

    token, pos: [1] int64 (pos = the sequence's cache length); keys/values: per layer
    [Hkv, cap, Dh] with cap > pos, written at pos in every layer; w: ``plan.weights``."""

    def decode_step(token: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
                    values: list[torch.Tensor], w: list[torch.Tensor]) -> torch.Tensor:
        length = pos.item()  # an unbacked int inside the graph: one graph for every length
        torch._check(length >= 0)
        x = w[plan.embed][token].float()  # [1, D]
        freqs = pos.float()[:, None] * w[plan.inv_freq][None, :]  # [1, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # [1, 1, Dh]
        cap = keys[0].shape[1]
        torch._check(length < cap)
        for i, p in enumerate(plan.layers):
            # every layer's buffers have one capacity (DenseKVCache grows them together): saying
            # so turns 2 x layers size symbols into one (shorter guards and call; measured 0.3 ms)
            torch._check(keys[i].shape[1] == cap)
            torch._check(values[i].shape[1] == cap)
            h = rms_norm(x, w[p.attn_norm], p.attn_eps)
            x = x + attention(p, w, h, cos, sin, pos, length, keys[i], values[i], plan.attn_impl)
            x = x + mlp(p, w, rms_norm(x, w[p.ffn_norm], p.ffn_eps))
        return head(plan, w, rms_norm(x, w[plan.norm], plan.norm_eps))

    return decode_step
