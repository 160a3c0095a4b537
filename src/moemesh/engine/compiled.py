"""Compiled decode: one sequence, one token, the whole model step as one ``torch.compile`` graph.

Eager ``Transformer.forward`` stays the reference and the fallback; this module only adds a
faster path for the case the engine hits most (a single running sequence decoding one token,
no prefill pending). The step function is written functionally over the model's own modules and
buffers (no weight is copied) and mirrors, op for op, what the eager layers compute:

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
(or ``$MOEMESH_COMPILE_CACHE``), so a second start skips most of the cold compile.

Limits: dense (GatedMLP) layers only -- an MoE layer calls an ExpertProvider that does
data-dependent Python, so such models stay eager (``unsupported_reason`` says why); DenseKVCache
only; fp32 caches only.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kvcache.dense import DenseKVCache
from ..layers.attention import Attention
from ..layers.batch import BatchLayout
from ..layers.head import OutputHead
from ..layers.mlp import ACTIVATIONS, GatedMLP
from ..layers.qlinear import QuantLinear
from ..layers.rope import apply_rope
from ..models.transformer import Transformer

log = logging.getLogger(__name__)

CACHE_ENV = "MOEMESH_COMPILE_CACHE"


def default_cache_dir() -> Path:
    """``$MOEMESH_COMPILE_CACHE`` or ``~/.cache/moemesh/inductor``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moemesh" / "inductor"


def use_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Point Inductor's on-disk caches at ``path`` (default: ``default_cache_dir()``), unless the
    user set ``TORCHINDUCTOR_CACHE_DIR`` themselves. Returns the directory in use."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if path is None and current and not getattr(use_cache_dir, "_ours", False):
        return Path(current)  # the user's choice wins over our default
    target = Path(path).expanduser() if path is not None else default_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target)
    use_cache_dir._ours = True  # type: ignore[attr-defined]
    return target


def unsupported_reason(model: Transformer) -> str | None:
    """Why ``model`` cannot use the compiled decode step, or None when it can."""
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.ffn, GatedMLP):
            return f"layer {i} feed-forward is {type(layer.ffn).__name__} (only dense GatedMLP layers compile)"
        if not isinstance(layer.attn, Attention):
            return f"layer {i} attention is {type(layer.attn).__name__}"
    if not isinstance(model.lm_head, OutputHead):
        return f"output head is {type(model.lm_head).__name__}"
    return None


# ---------------------------------------------------------------- functional building blocks
def linear(ql: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward for a few rows (M < dequant_min_m), traceable. x: [M, K] fp32 -> [M, N] fp32."""
    if ql.mode == "fp32":
        return F.linear(x, ql.weight, ql.bias)
    xb = x.to(torch.bfloat16)
    if ql.mode == "int4":
        y = torch._weight_int4pack_mm_for_cpu(xb, ql.qweight, ql.group_size, ql.scales_and_zeros)
        y = y[:, : ql.out_features]
    elif ql.mode == "int8":
        y = torch._weight_int8pack_mm(xb, ql.qweight, ql._ones)
        return torch.mul(y, ql.scales) if ql.bias is None else torch.addcmul(ql.bias, y, ql.scales)
    else:  # bf16
        y = F.linear(xb, ql.weight)
    return y.float() if ql.bias is None else torch.add(y, ql.bias)


def attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
              length, keys: torch.Tensor, values: torch.Tensor, impl: str = "fused") -> torch.Tensor:
    """Attention.forward + DenseKVCache.attend for one token. x: [1, D]; keys/values: [Hkv, cap, Dh]
    (written at ``length`` in place); returns [1, D]."""
    hq, hkv, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = linear(attn.qkv, x).split([hq * dh, hkv * dh, hkv * dh], dim=-1)
    if attn.qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.clip_qkv is not None:
        q, k, v = (z.clamp(-attn.clip_qkv, attn.clip_qkv) for z in (q, k, v))
    q, k, v = q.view(1, hq, dh), k.view(1, hkv, dh), v.reshape(1, hkv, dh)
    if attn.qk_norm == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys.index_copy_(1, pos, k.transpose(0, 1))  # [Hkv, 1, Dh] at column `length`
    values.index_copy_(1, pos, v.transpose(0, 1))
    end = length + 1
    lo = 0 if attn.window is None else torch.sym_max(0, end - attn.window)
    ks, vs = keys[:, lo:end], values[:, lo:end]  # [Hkv, L, Dh]
    qg = q.view(hkv, hq // hkv, dh)  # [Hkv, G, Dh]
    if impl == "bmm":
        probs = torch.softmax(torch.bmm(qg, ks.transpose(1, 2)) * attn.scale, dim=-1)  # [Hkv, G, L]
        out = torch.bmm(probs, vs).reshape(1, hq * dh)
    else:  # elementwise products + sums: Inductor fuses them with the softmax, no extern GEMM calls
        scores = (qg[:, :, None, :] * ks[:, None, :, :]).sum(-1) * attn.scale  # [Hkv, G, L]
        probs = torch.softmax(scores, dim=-1)
        out = (probs[..., None] * vs[:, None, :, :]).sum(-2).reshape(1, hq * dh)  # [Hkv, G, Dh]
    return linear(attn.o_proj, out)


def mlp(ffn: GatedMLP, x: torch.Tensor) -> torch.Tensor:
    gate, up = linear(ffn.gate_up, x).chunk(2, dim=-1)  # [1, I] each
    return linear(ffn.down, ACTIVATIONS[ffn.act_name](gate) * up)


def head(h: OutputHead, x: torch.Tensor) -> torch.Tensor:
    """OutputHead.forward, traceable. x: [1, D] -> [1, V]."""
    if h.approx is None:
        return F.linear(x, h.weight)
    logits = linear(h.approx, x)  # [1, V]
    top = logits.topk(h.rescore, dim=-1).indices  # [1, R]
    exact = torch.einsum("bd,brd->br", x, h.weight[top].float())  # [1, R]
    return logits.scatter(-1, top, exact)


class DecodeGraph(torch.nn.Module):
    """The step function, as a module holding *references* to the model's modules (no copies)."""

    def __init__(self, model: Transformer, attn_impl: str = "fused") -> None:
        super().__init__()
        self.attn_impl = attn_impl
        self.layers = model.layers
        self.norm = model.norm
        self.lm_head = model.lm_head
        self.embed = model.embed  # plain attribute: the same tensor, not a copy
        self.register_buffer("inv_freq", model.rope.inv_freq, persistent=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        """token, pos: [1] int64 (pos = the sequence's cache length); keys/values: per layer
        [Hkv, cap, Dh] with cap > pos. Returns logits [1, V]; writes k/v at pos in every layer."""
        length = pos.item()
        torch._check(length >= 0)
        x = self.embed[token].float()  # [1, D]
        freqs = pos.float()[:, None] * self.inv_freq[None, :]  # [1, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # [1, 1, Dh]
        for i, layer in enumerate(self.layers):
            torch._check(length < keys[i].shape[1])
            x = x + attention(layer.attn, layer.attn_norm(x), cos, sin, pos, length, keys[i], values[i],
                                 self.attn_impl)
            x = x + mlp(layer.ffn, layer.ffn_norm(x))
        return head(self.lm_head, self.norm(x))


class CompiledDecoder:
    """``step(token, cache, seq_id)``: the compiled equivalent of
    ``model(tensor([token]), tensor([len]), cache, BatchLayout([seq_id], [1]))`` for a DenseKVCache.

    Compiles lazily on the first step. ``cpp_wrapper`` and ``freezing`` are Inductor options;
    ``cache_dir`` as in ``use_cache_dir``. ``compile_seconds`` records the first (compiling) call.
    """

    def __init__(self, model: Transformer, cache_dir: str | os.PathLike | None = None,
                 cpp_wrapper: bool = True, freezing: bool = False, max_autotune: bool = False,
                 attn_impl: str = "fused", inductor_options: dict | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"compiled decode unsupported: {reason}")
        self.model = model
        self.graph = DecodeGraph(model, attn_impl).eval()
        self.cache_dir = cache_dir
        self.options = {"cpp_wrapper": cpp_wrapper, "freezing": freezing}
        if max_autotune:
            self.options["max_autotune"] = True
        self.options.update(inductor_options or {})
        self.compile_seconds: float | None = None
        self._fn = None

    def _compiled(self):
        if self._fn is None:
            use_cache_dir(self.cache_dir)
            torch._dynamo.config.capture_scalar_outputs = True  # pos.item() stays in the graph
            self._fn = torch.compile(self.graph, fullgraph=True, dynamic=False, options=self.options)
        return self._fn

    @torch.inference_mode()
    def step(self, token: int, cache: DenseKVCache, seq_id: int) -> torch.Tensor:
        """Decode one token of ``seq_id``: returns logits [1, V] and advances the cache by one."""
        batch = BatchLayout([seq_id], [1])
        seq = cache.seqs[seq_id]
        pos = torch.tensor([seq.length], dtype=torch.long)
        cache.begin(batch)  # grows the buffers if needed (by doubling)
        for t in (*seq.keys, *seq.values):
            torch._dynamo.mark_dynamic(t, 1)  # capacity: one graph for every size
        tok = torch.tensor([token], dtype=torch.long)
        fn = self._compiled()
        if self.compile_seconds is None:
            t0 = time.perf_counter()
            logits = fn(tok, pos, seq.keys, seq.values)
            self.compile_seconds = time.perf_counter() - t0
        else:
            logits = fn(tok, pos, seq.keys, seq.values)
        cache.end(batch)
        return logits

    def supports(self, cache) -> bool:
        return type(cache) is DenseKVCache and cache.dtype == torch.float32


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

    def _give_up(self, why: str) -> None:
        self.disabled = why
        warnings.warn(f"compiled decode disabled, decoding eagerly: {why}", RuntimeWarning, stacklevel=3)

    def maybe_step(self, token_chunks: list[list[int]], in_prefill: list[bool], seq_ids: list[int],
                   cache) -> torch.Tensor | None:
        if self.disabled or len(seq_ids) != 1 or in_prefill[0] or len(token_chunks[0]) != 1:
            return None
        if not (type(cache) is DenseKVCache and cache.dtype == torch.float32):
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
