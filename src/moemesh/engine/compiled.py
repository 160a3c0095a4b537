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
for the same input. Int4 linears of at least ``int4_ops.NATIVE_LINEAR_MIN_BYTES`` (2 MiB packed:
the Qwen3-shaped attention, large output heads) run moemesh's C kernel as the custom op
``moemesh::int4_linear`` on the fp32 input, as the eager layer does (its bits); smaller ones keep
torch's kernel on a bf16 input (a custom op call costs ~8 us: more than these save). Lazy or
remote experts stay eager (``unsupported_reason`` says why); DenseKVCache with fp32 buffers only;
one sequence per step (batched steps stay eager).
"""
from __future__ import annotations

import os
import time
import types
import warnings
import weakref
from pathlib import Path

import torch

from ..batch import BatchLayout
from ..kvcache.dense import DenseKVCache
from ..models.transformer import Transformer
from .step_fn import StepPlan, make_step, unsupported_reason  # noqa: F401  (re-exported for callers and tests)

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
