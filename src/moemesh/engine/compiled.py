"""Compiled decode: one sequence, one token, the whole model step as one ``torch.compile`` graph.

The graph is traced from the model's own module code (``Transformer.hidden_states`` and ``logits``, as
gpt-fast compiles its model's forward): there is no second forward to keep in step. What a graph needs
from the model comes through the seams:

* the KV cache gives its one-token form (``KVCache.decode_buffers`` / ``decode_view``): each layer's
  K/V buffers are graph inputs (never captured), so capacity growth (the cache doubles) needs no
  recompile (the capacity is a dynamic dimension), and the sequence's length is ``pos`` ([1] int64),
  read inside the graph as an unbacked int, so one graph serves every length and every sequence; the
  new k/v are written at ``length`` in place and attention runs over the real length, no mask;
* every module with a graph form to prepare says so (``prepare_graph``: QuantLinear picks its kernel
  in the graph, MoEBlock asks its ExpertProvider for ``decode_op``); one that has none declines the
  model with a reason (lazy or remote experts today), and decoding stays eager;
* C kernels run as custom ops (quant/int4_ops.py): ``moemesh::moe_decode`` (a layer's routed experts,
  the eager MoE layer's bits) and ``moemesh::int4_linear`` (int4 linears of >= 2 MiB packed; smaller
  ones run torch's kernel on a bf16 input: a custom op call costs ~8 us, more than they save).

Compiled artifacts (Inductor's FX graph cache, AOT autograd cache, the generated C++) live in
``TORCHINDUCTOR_CACHE_DIR``; when that is unset it is pointed at ``~/.cache/moemesh/inductor``
(or ``$MOEMESH_COMPILE_CACHE``), so a second start skips most of the cold compile (SmolLM2 on
2 cores: ~110 s cold, ~9 s warm; the warm part is Dynamo re-tracing the 30 layers).

Numerics: fp32 models match eager to ~1e-6 relative; with int4/int8/bf16 weights the bf16
rounding of matmul inputs turns last-bit fp32 differences (Inductor's fused RMSNorm vs
F.rms_norm) into ~1% relative logit differences, well inside each path's distance to fp32, but
enough to flip a greedy near-tie now and then (tests/test_compiled.py has the measurements).
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
from ..kvcache.base import KVCache
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


def _stance() -> str:
    """The current torch.compiler stance ("default" unless a caller set another)."""
    current = getattr(torch._dynamo.eval_frame, "_stance", None)
    return getattr(current, "stance", "default")


class CompiledDecoder:
    """``step(token, cache, seq_id)``: the compiled equivalent of
    ``model(tensor([token]), tensor([len]), cache, BatchLayout([seq_id], [1]))`` for a cache with a
    one-token form (``KVCache.decode_buffers``).

    Compiles lazily on the first step; ``compile_seconds`` records that first call. Options
    (defaults are the fastest measured on SmolLM2, 2 threads): ``cpp_wrapper`` (C++ graph
    launcher), ``freezing`` / ``max_autotune`` (Inductor; no gain measured), ``skip_guards`` (see
    ``step``), ``cache_dir`` as in ``use_cache_dir``; ``backend="eager"`` traces with Dynamo only and
    runs the traced graph op by op (seconds: tests that every layer type traces, whole graph).
    """

    def __init__(self, model: Transformer, cache_dir: str | os.PathLike | None = None,
                 cpp_wrapper: bool = True, freezing: bool = False, max_autotune: bool = False,
                 inductor_options: dict | None = None, skip_guards: bool = True, backend: str = "inductor") -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"compiled decode unsupported: {reason}")
        self.model = model
        self.cache_dir = cache_dir
        self.options = {"cpp_wrapper": cpp_wrapper, "freezing": freezing}
        if max_autotune:
            self.options["max_autotune"] = True
        self.options.update(inductor_options or {})
        self.backend = backend
        self.skip_guards = skip_guards
        self.compile_seconds: float | None = None
        self._fn = None
        self._marked = None  # weakref to the first K buffer the last compiled call saw

    def _compiled(self):
        if self._fn is None:
            use_cache_dir(self.cache_dir)
            step = make_step(self.model)
            # a code object of its own: Dynamo keys its cache (and recompile limit) per code
            # object, so decoders of different models never share or evict each other's graphs
            step = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__,
                                      step.__defaults__, step.__closure__)
            options = self.options if self.backend == "inductor" else None
            self._fn = torch.compile(step, fullgraph=True, dynamic=False, backend=self.backend, options=options)
        return self._fn

    @torch.inference_mode()
    def step(self, token: int, cache: KVCache, seq_id: int) -> torch.Tensor | None:
        """Decode one token of ``seq_id``: returns logits [1, V] and advances the cache by one; None
        (nothing done) when the cache has no one-token form (``KVCache.decode_buffers``)."""
        batch = BatchLayout([seq_id], [1])
        pos = torch.tensor([cache.length(seq_id)], dtype=torch.long)
        cache.begin(batch)  # grows the buffers if needed (by doubling)
        buffers = cache.decode_buffers(seq_id)
        if buffers is None:
            return None
        keys, values = buffers
        fresh = self._marked is None or self._marked() is not keys[0]
        if fresh:  # new buffers (another sequence, or grown): their capacity is a dynamic dim
            for t in (*keys, *values):
                torch._dynamo.mark_dynamic(t, 1)
            self._marked = weakref.ref(keys[0])
        tok = torch.tensor([token], dtype=torch.long)
        fn = self._compiled()
        args = (tok, pos, keys, values, cache)
        if self.skip_guards and not fresh and self.compile_seconds is not None and _stance() == "default":
            # Same model, same buffers as the last call, which passed every guard; only pos and
            # token differ, and they are values inside the graph, not guarded. Skipping the
            # guards (~300 tensors' checks) saves ~0.3 ms per token. New buffers (above) are
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
    decoding one token on a cache with a one-token form (the dense fp32 cache), and returns None (the engine then runs eagerly) in every
    other case, or when the model cannot compile (one warning) or compiling fails (one warning,
    then eager for good). Compiles lazily, on the first eligible step."""

    def __init__(self, model: Transformer, **options) -> None:
        self.model = model
        self.options = options
        self.decoder: CompiledDecoder | None = None
        self.disabled: str | None = None  # why we gave up, once we have
        self.warned_cache = False

    def _warn_cache(self, cache) -> None:
        if not self.warned_cache:
            self.warned_cache = True
            warnings.warn(f"compiled decode needs a KV cache with a one-token form (the dense fp32 KV cache), not "
                          f"{type(cache).__name__}; decoding eagerly", RuntimeWarning, stacklevel=3)

    def _give_up(self, why: str) -> None:
        self.disabled = why
        warnings.warn(f"compiled decode disabled, decoding eagerly: {why}", RuntimeWarning, stacklevel=3)

    def maybe_step(self, token_chunks: list[list[int]], in_prefill: list[bool], seq_ids: list[int],
                   cache) -> torch.Tensor | None:
        if self.disabled or len(seq_ids) != 1 or in_prefill[0] or len(token_chunks[0]) != 1:
            return None
        if not isinstance(cache, KVCache) or type(cache).decode_buffers is KVCache.decode_buffers:
            self._warn_cache(cache)
            return None
        if self.decoder is None:
            reason = unsupported_reason(self.model)
            if reason is not None:
                self._give_up(reason)
                return None
            self.decoder = CompiledDecoder(self.model, **self.options)
        try:
            logits = self.decoder.step(token_chunks[0][0], cache, seq_ids[0])
            if logits is None:
                self._warn_cache(cache)
            return logits
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always correct
            self._give_up(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            return None


def unsupported_reason(model: Transformer) -> str | None:
    """Prepare every module of ``model`` that has a graph form to prepare (``prepare_graph``: kernels
    picked, the experts' graph ops asked for) and return why the model cannot be traced, or None."""
    if not isinstance(model.embed, torch.Tensor):
        return "the embedding table is kept in a block format (rows decoded per lookup)"
    if getattr(model.lm_head, "weight", True) is None:
        return "the output head is computed over block-format rows"
    for name, module in model.named_modules():
        prepare = getattr(module, "prepare_graph", None)
        why = prepare() if prepare is not None else None
        if why:
            return f"{name}: {why}"
    return None


def make_step(model: Transformer):
    """The decode step over ``model``'s own module code: step(token, pos, keys, values, cache) -> logits
    [1, V]. token, pos: [1] int64 (pos = the sequence's cache length); keys/values: the cache's
    ``decode_buffers`` (written at pos in every layer); cache: the KVCache that made them (its
    ``decode_view`` is built inside the graph)."""
    one = BatchLayout([0], [1])  # the view ignores sequence ids: one layout for every sequence

    def decode_step(token: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    cache: KVCache) -> torch.Tensor:
        view = cache.decode_view(keys, values, pos)
        return model.logits(model.hidden_states(token, pos, view, one))

    return decode_step
