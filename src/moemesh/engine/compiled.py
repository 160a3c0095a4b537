"""Compiled decode: one sequence, one token, the whole model step as one ``torch.compile`` graph.

Eager ``Transformer.forward`` stays the reference and the fallback; this module only adds a
faster path for the case the engine hits most (a single running sequence decoding one token,
no prefill pending). The step function is written functionally over references to the model's
own tensors (no weight is copied) and mirrors, op for op, what the eager layers compute:

* residual stream, RMSNorm, RoPE, attention and the KV cache stay fp32; activations are cast
  to bf16 only at the int4/int8/bf16 matmul inputs (as ``QuantLinear.forward`` does for M=1);
* each layer's K/V are the sequence's own ``DenseKVCache`` buffers, passed in as graph inputs
  (never captured), so capacity growth (the cache doubles) needs no recompile: the capacity is
  a dynamic dimension and the current length is read inside the graph from ``pos`` (an
  unbacked int), so one graph serves every length;
* the new k/v are written at ``length`` (``index_copy_`` into the input buffer, in place) and
  attention runs over ``[:length + 1]``, the real length, not a padded one with a mask;
* the output head keeps its semantics: approximate (quantized) logits with the top
  ``rescore`` candidates recomputed exactly.

Compiled artifacts (Inductor's FX graph cache, AOT autograd cache, the generated C++) live in
``TORCHINDUCTOR_CACHE_DIR``; when that is unset it is pointed at ``~/.cache/moemesh/inductor``
(or ``$MOEMESH_COMPILE_CACHE``), so a second start skips most of the cold compile (SmolLM2 on
2 cores: ~110 s cold, ~9 s warm; the warm part is Dynamo re-tracing the 30 layers).

Numerics: fp32 models match eager to ~1e-6 relative; with int4/int8/bf16 weights the bf16
rounding of matmul inputs turns last-bit fp32 differences (Inductor's fused RMSNorm vs
F.rms_norm) into ~1% relative logit differences, well inside each path's distance to fp32, but
enough to flip a greedy near-tie now and then (tests/test_compiled.py has the measurements).

MoE layers compile when their experts are resident int4 SwiGLUs the fused kernel reads (top-k
softmax router, no shared expert): the router runs in the graph and the experts run as one opaque
custom op, ``moemesh::moe_decode`` (layers/int4_ops.py), which returns the eager MoE layer's bits
for the same input. Linears keep torch's int4 kernel: a Python custom op per linear
(``moemesh::int4_mm``) cost SmolLM2's compiled decode ~40% (117 -> 70 tok/s, bench/decode.py,
one noisy run), so it is not used here. Lazy or remote experts stay eager (``unsupported_reason``
says why); DenseKVCache with fp32 buffers only; one sequence per step (batched steps stay eager).
"""
from __future__ import annotations

import os
import time
import types
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kvcache.dense import DenseKVCache
from ..layers.attention import Attention
from ..layers.batch import BatchLayout
from ..experts.provider import ResidentExperts
from ..layers import int4_ops
from ..layers.head import OutputHead
from ..layers.moe import MoEBlock
from ..layers.router import TopKRouter
from ..layers.mlp import ACTIVATIONS, GatedMLP
from ..layers.qlinear import QuantLinear
from ..layers.rope import apply_rope
from ..models.transformer import Transformer

CACHE_ENV = "MOEMESH_COMPILE_CACHE"


def default_cache_dir() -> Path:
    """``$MOEMESH_COMPILE_CACHE`` or ``~/.cache/moemesh/inductor``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moemesh" / "inductor"


def use_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Point Inductor's on-disk caches (FX graph, AOT autograd, generated code) at ``path``. With
    no path: keep a ``TORCHINDUCTOR_CACHE_DIR`` the user set, else use ``default_cache_dir()``.
    Returns the directory in use."""
    if path is None:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current and os.path.abspath(current) != os.path.abspath(torch_default()):
            return Path(current)  # set by the user (torch itself writes its /tmp default there)
        path = default_cache_dir()
    target = Path(path).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target)
    return target


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
    if int4_ops.expert_table(ffn.provider.experts[ffn.layer]) is None:
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
        tensors = {"int4": ("qweight", "scales_and_zeros"), "int8": ("qweight", "_ones", "scales"),
                   "bf16": ("weight",), "fp32": ("weight",)}[ql.mode]
        self.idx = tuple(_add(w, getattr(ql, name)) for name in tensors)
        self.bias = None if ql.bias is None else _add(w, ql.bias)


class MoEPlan:
    """A resident int4 MoE layer: router weight and the experts' pointer table in the weight list."""

    def __init__(self, ffn: MoEBlock, w: list[torch.Tensor]) -> None:
        experts = ffn.provider.experts[ffn.layer]
        self.router, self.top_k, self.norm_topk = _add(w, ffn.router.weight), ffn.router.top_k, ffn.router.norm_topk_prob
        self.table = _add(w, int4_ops.expert_table(experts))
        e = experts[0]
        self.inter, self.gu_npad, self.dn_npad = e.down.in_features, e.gate_up.qweight.shape[0], e.down.qweight.shape[0]


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
        return torch.ops.moemesh.moe_decode(x, ids, weights, w[m.table], m.inter, m.gu_npad, m.dn_npad)
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


def _stance() -> str:
    """The current torch.compiler stance ("default" unless a caller set another)."""
    current = getattr(torch._dynamo.eval_frame, "_stance", None)
    return getattr(current, "stance", "default")


class CompiledDecoder:
    """``step(token, cache, seq_id)``: the compiled equivalent of
    ``model(tensor([token]), tensor([len]), cache, BatchLayout([seq_id], [1]))`` for a DenseKVCache.

    Compiles lazily on the first step; ``compile_seconds`` records that first call. Options
    (defaults are the fastest measured on SmolLM2, 2 threads): ``cpp_wrapper`` (C++ graph
    launcher), ``freezing`` / ``max_autotune`` (Inductor; no gain measured), ``attn_impl``
    ("bmm": two batched GEMMs + a fused softmax, best at long contexts; "sdpa": one fused CPU
    attention kernel, same speed; "fused": Inductor-generated reductions, slower past a few
    hundred tokens), ``skip_guards`` (see ``step``), ``cache_dir`` as in ``use_cache_dir``.
    """

    def __init__(self, model: Transformer, cache_dir: str | os.PathLike | None = None,
                 cpp_wrapper: bool = True, freezing: bool = False, max_autotune: bool = False,
                 attn_impl: str = "bmm", inductor_options: dict | None = None, skip_guards: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"compiled decode unsupported: {reason}")
        self.model = model
        self.plan = StepPlan(model, attn_impl)
        self.cache_dir = cache_dir
        self.options = {"cpp_wrapper": cpp_wrapper, "freezing": freezing}
        if max_autotune:
            self.options["max_autotune"] = True
        self.options.update(inductor_options or {})
        self.skip_guards = skip_guards
        self.compile_seconds: float | None = None
        self._fn = None
        self._marked = None  # weakref to the first K buffer the last compiled call saw

    def _compiled(self):
        if self._fn is None:
            use_cache_dir(self.cache_dir)
            step = make_step(self.plan)
            # a code object of its own: Dynamo keys its cache (and recompile limit) per code
            # object, so decoders of different models never share or evict each other's graphs
            step = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__,
                                      step.__defaults__, step.__closure__)
            self._fn = torch.compile(step, fullgraph=True, dynamic=False, options=self.options)
        return self._fn

    @torch.inference_mode()
    def step(self, token: int, cache: DenseKVCache, seq_id: int) -> torch.Tensor:
        """Decode one token of ``seq_id``: returns logits [1, V] and advances the cache by one."""
        batch = BatchLayout([seq_id], [1])
        seq = cache.seqs[seq_id]
        pos = torch.tensor([seq.length], dtype=torch.long)
        cache.begin(batch)  # grows the buffers if needed (by doubling)
        fresh = self._marked is None or self._marked() is not seq.keys[0]
        if fresh:  # new buffers (another sequence, or grown): their capacity is a dynamic dim
            for t in (*seq.keys, *seq.values):
                torch._dynamo.mark_dynamic(t, 1)
            self._marked = weakref.ref(seq.keys[0])
        tok = torch.tensor([token], dtype=torch.long)
        fn = self._compiled()
        args = (tok, pos, seq.keys, seq.values, self.plan.weights)
        if self.skip_guards and not fresh and self.compile_seconds is not None and _stance() == "default":
            # Same weights list, same buffers as the last call, which passed every guard; only
            # pos and token differ, and they are values inside the graph, not guarded. Skipping
            # the guards (~300 tensors' checks) saves ~0.3 ms per token. New buffers (above) are
            # always checked in full, so a graph never runs on inputs it was not built for.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                logits = fn(*args)
        else:  # may trace: pos.item() must stay in the graph (scoped config; ~70 us, so not always)
            t0 = time.perf_counter()
            with torch._dynamo.config.patch(capture_scalar_outputs=True):
                logits = fn(*args)
            if self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - t0
        cache.end(batch)
        return logits


class CompiledDecode:
    """The engine's opt-in hook: ``maybe_step`` runs the compiled step when exactly one sequence is
    decoding one token on a DenseKVCache, and returns None (the engine then runs eagerly) in every
    other case, or when the model cannot compile (one warning) or compiling fails (one warning,
    then eager for good). Compiles lazily, on the first eligible step."""

    def __init__(self, model: Transformer, **options) -> None:
        self.model = model
        self.options = options
        self.decoder: CompiledDecoder | None = None
        self.disabled: str | None = None  # why we gave up, once we have
        self.warned_cache = False

    def _give_up(self, why: str) -> None:
        self.disabled = why
        warnings.warn(f"compiled decode disabled, decoding eagerly: {why}", RuntimeWarning, stacklevel=3)

    def maybe_step(self, token_chunks: list[list[int]], in_prefill: list[bool], seq_ids: list[int],
                   cache) -> torch.Tensor | None:
        if self.disabled or len(seq_ids) != 1 or in_prefill[0] or len(token_chunks[0]) != 1:
            return None
        if not (type(cache) is DenseKVCache and cache.dtype == torch.float32):
            if not self.warned_cache:
                self.warned_cache = True
                warnings.warn(f"compiled decode needs the dense fp32 KV cache, not {type(cache).__name__}; "
                              "decoding eagerly", RuntimeWarning, stacklevel=2)
            return None
        if self.decoder is None:
            reason = unsupported_reason(self.model)
            if reason is not None:
                self._give_up(reason)
                return None
            self.decoder = CompiledDecoder(self.model, **self.options)
        try:
            return self.decoder.step(token_chunks[0][0], cache, seq_ids[0])
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always correct
            self._give_up(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            return None
