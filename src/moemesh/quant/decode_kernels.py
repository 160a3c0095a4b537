"""The fp32 steps between a forward pass's matmuls as C calls (decode_kernels.c), built on first use.

A decode token of a small model is dispatch-bound: each torch op on a [1, D] tensor costs a few
microseconds (``F.rms_norm`` on CPU is several), and a layer has dozens of them. Each function here
is one ctypes call (~1 us) doing what several torch ops did, on fp32 contiguous rows:

* ``rms_norm``: rows -> x * w / sqrt(mean(x^2) + eps) (the reference: ``F.rms_norm``; same values
  up to summation order, 16 partial sums);
* ``rope_``: the rotate-half rotary embedding in place (bit for bit ``layers.rope.apply_rope``: the
  library is built with -ffp-contract=off, so products and sums round as torch's do);
* ``attend_one``: one query token appends its k/v to a sequence's cache buffers and attends over the
  visible run, sinks optional (the reference: ``kvcache.decode_attention.decode_attention``);
* ``attend_batch``: ``attend_one`` for one token of each of B sequences, one call, the sequences shared
  out over the threads (each row the bits it has alone);
* ``attend_prefill``: a prompt chunk's queries over their sequence's keys, causal, sliding window and
  sinks optional, in key blocks with an online softmax (attention_prefill.c; the references: the masked
  softmax of ``kvcache.sinks`` / SDPA / ``kvcache.causal_attention``, equal to fp32 rounding);
* ``greedy``: each row's argmax and its log-probability in one pass, for a sampler step that needs
  nothing else (the reference: ``argmax`` and ``log_softmax`` over the row; head_kernels.c);
* ``head_rescore``: an approximate output head's best candidates recomputed exactly (the reference:
  ``layers.head.OutputHead.rescore_reference``: topk, an einsum, a scatter; head_kernels.c);
* ``router_topk``: a softmax router's top k per row (logits, softmax, selection, renormalisation; the
  reference: ``layers.router.TopKRouter.reference``, the same up to summation order and ties);
* ``dk_decode_layers`` (decode_step.c): a planned decode token's layers, those calls from one C loop
  (engine/decode_step.py builds its table);
* ``heads_i8``: H per-head matrix-vector products with int8 weights and per-row scales (MLA's absorbed
  matrices; the reference: ``heads_i8_reference``, an einsum over the same int8 values).

Every row (and head) is computed on its own, so results do not depend on what else is in the batch.
``MOEMESH_DECODE_NATIVE=0``, no compiler, or a failed build: ``load()`` is None and callers run the
torch reference. Inside a compiled graph callers use torch ops (Inductor fuses them itself).
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from .native import BASE_FLAGS, load_library

HERE = Path(__file__).parent
SOURCES = ("decode_common.h", "decode_kernels.c", "head_kernels.c", "decode_step.c", "attention_prefill.c")
FLAGS = (*BASE_FLAGS, "-ffp-contract=off")  # no fused multiply-adds: torch's rounding of a*b + c*d
ENV = "MOEMESH_DECODE_NATIVE"


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The library, or None when disabled (MOEMESH_DECODE_NATIVE=0, read once: an environment lookup
    costs ~2 us and the callers run dozens of times per token) or unavailable."""
    if os.environ.get(ENV, "1") == "0":
        return None
    try:
        lib = load_library("decode_kernels", HERE, SOURCES, list(FLAGS))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.dk_rms_norm.argtypes = [p, i64, i64, i64, p, f32, p, i64]
    lib.dk_rms_norm.restype = None
    lib.dk_rope.argtypes = [p, i64, i64, i64, i64, i64, p, p]
    lib.dk_rope.restype = None
    lib.dk_attend_one.argtypes = [p, i64, p, i64, p, i64, p, p, i64, i64, i64, i64, i64, i64, i64, i64, f32, p, p, i32]
    lib.dk_attend_one.restype = i32
    lib.dk_attend_batch.argtypes = [i64, p, i64, i64, p, i64, i64, p, i64, i64, p, p, p, p, p, i64, i64, i64, i64, f32,
                                    p, p, i32]
    lib.dk_attend_batch.restype = i32
    lib.dk_attend_prefill.argtypes = [p, i64, i64, i64, i64, p, p, i64, i64, i64, i64, i64, i64, i64, f32, p, p, i64,
                                      i64, i32]
    lib.dk_attend_prefill.restype = i32
    lib.dk_heads_i8.argtypes = [p, i64, i64, i64, i64, i64, p, p, i64, p, i32]
    lib.dk_heads_i8.restype = None
    lib.dk_greedy.argtypes = [p, i64, i64, i64, p, p]
    lib.dk_greedy.restype = None
    lib.dk_router_topk.argtypes = [p, i64, i64, i64, p, i64, i64, i32, p, p, i32]
    lib.dk_router_topk.restype = i32
    lib.dk_router_logits_topk.argtypes = [p, i64, i64, i64, p, p, i64, i64, p, p, i32]
    lib.dk_router_logits_topk.restype = i32
    lib.dk_add.argtypes = [p, p, i64]
    lib.dk_add.restype = None
    lib.dk_head_rescore.argtypes = [p, i64, i64, i64, p, i64, p, i32, i64, i64]
    lib.dk_head_rescore.restype = i32
    lib.dk_decode_layers.argtypes = [p, i64, p, i64, p, i64, p, p, i64, i32]  # (engine/decode_step.py)
    lib.dk_decode_layers.restype = i32
    lib.dk_decode_layers_batch.argtypes = [p, i64, i64, p, i64, p, i64, i64, p, p, p, i32]
    lib.dk_decode_layers_batch.restype = i32
    return lib if lib.dk_simd() == 1 else None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels read these tensors as they are: fp32 (CPU tensors: moemesh runs on the
    CPU), not inside a graph."""
    return not torch.compiler.is_compiling() and all(t.dtype == torch.float32 for t in tensors)


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x fp32 [..., D] (rows contiguous in D), weight fp32 [D] -> a new [..., D]."""
    d = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, d)  # a view when rows are evenly strided
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], d)  # (ints, not a shape tuple or a dtype: cheaper to parse)
    lib.dk_rms_norm(x2.data_ptr(), x2.shape[0], d, x2.stride(0), weight.data_ptr(), eps, y.data_ptr(), d)
    return y if x.dim() == 2 else y.view(x.shape)


def rope_(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x fp32 [T, H, Dh] (Dh contiguous) rotated in place by cos/sin [T, 1, Dh] (contiguous); returns x."""
    t, h, dh = x.shape
    lib.dk_rope(x.data_ptr(), t, h, dh, x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr())
    return x


def attend_one(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               keys: torch.Tensor, values: torch.Tensor, dv: int, pos: int, lo: int, scale: float,
               sinks: torch.Tensor | None) -> torch.Tensor:
    """One decode token: write k [(1,) Hkv, Dh] and v [(1,) Hkv, Dv] (None: nothing to write: values
    live in the keys) at row ``pos`` of keys [Hkv, cap, Dh] / values [Hkv, cap, >= Dv] (``values`` may
    be the keys themselves: MLA's values are the keys' first Dv coordinates), then attend q [(1,) Hq, Dh]
    over rows [lo, pos] -> [1, Hq, Dv]. sinks: fp32 [Hq] or None."""
    q = q.contiguous()  # (no-ops for the rows the attention layers pass)
    k = k if k is None or k.stride(-1) == 1 else k.contiguous()
    v = v if v is None or v.stride(-1) == 1 else v.contiguous()
    hq, dh = q.shape[-2:]
    hkv, cap, _ = keys.shape
    out = torch.empty(1, hq, dv)
    rc = lib.dk_attend_one(
        q.data_ptr(), hq, None if k is None else k.data_ptr(), 0 if k is None else k.stride(-2),
        None if v is None else v.data_ptr(), 0 if v is None else v.stride(-2), keys.data_ptr(), values.data_ptr(),
        hkv, cap, dh, dv, values.stride(1), pos, lo, pos + 1, scale, None if sinks is None else sinks.data_ptr(),
        out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"attend_one: bad shapes q {tuple(q.shape)}, keys {tuple(keys.shape)}, pos {pos}, lo {lo}")
    return out


def attend_prefill(lib: ctypes.CDLL, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dv: int, start: int,
                   window: int | None, scale: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """n queries q [n, Hq, Dh] (Dh contiguous) at positions start .. start + n - 1 over their sequence's keys
    [Hkv, cap, Dh] / values [Hkv, cap, >= Dv] (their own keys already written; ``values`` may be the keys:
    MLA), each query seeing keys [0 or pos - window + 1, pos] -> [n, Hq, Dv]. sinks: fp32 [Hq] or None.
    A query's output does not depend on the other queries of the call (attention_prefill.c)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    n, hq, dh = q.shape
    hkv, cap, _ = keys.shape
    out = torch.empty(n, hq, dv)
    rc = lib.dk_attend_prefill(q.data_ptr(), n, hq, q.stride(0), q.stride(1), keys.data_ptr(), values.data_ptr(), hkv,
                               cap, dh, dv, values.stride(1), start, window or 0, scale,
                               None if sinks is None else sinks.data_ptr(), out.data_ptr(), out.stride(0),
                               out.stride(1), torch.get_num_threads())
    if rc:
        raise ValueError(f"attend_prefill: {'no memory' if rc == -2 else 'bad shapes'}: q {tuple(q.shape)}, keys "
                         f"{tuple(keys.shape)}, start {start}, window {window}")
    return out


def prefill_usable(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dv: int) -> bool:
    """Whether ``attend_prefill`` takes these: fp32, head dims in whole 16-lane vectors, the keys one buffer
    [Hkv, cap, Dh] and the values [Hkv, cap, v_stride] rows (a buffer of their own, or the keys' first Dv)."""
    return (usable(q, keys, values) and q.shape[-1] % 16 == 0 and dv % 16 == 0 and keys.is_contiguous()
            and keys.shape[-1] == q.shape[-1] and values.stride(-1) == 1
            and values.stride(0) == keys.shape[1] * values.stride(1))


def attend_batch(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, keys: list[torch.Tensor],
                 values: list[torch.Tensor], dv: int, pos: list[int], lo: list[int], scale: float,
                 sinks: torch.Tensor | None) -> torch.Tensor:
    """One decode token of each of B sequences in one call: ``attend_one`` for row i of q [B, Hq, Dh], k [B,
    Hkv, Dh], v [B, Hkv, Dv] (None: values live in the keys) on sequence i's buffers keys[i] [Hkv, cap_i, Dh] /
    values[i] (same strides past the capacity), row pos[i], visible from lo[i] -> [B, Hq, Dv]; each row the
    bits ``attend_one`` gives it alone."""
    q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v is None or v.stride(-1) == 1 else v.contiguous()
    b, hq, dh = q.shape
    hkv = keys[0].shape[0]
    out = torch.empty(b, hq, dv)
    ptrs = torch.tensor([[t.data_ptr() for t in keys], [t.data_ptr() for t in values], [t.shape[1] for t in keys],
                         pos, lo], dtype=torch.int64)  # [5, B]
    rc = lib.dk_attend_batch(
        b, q.data_ptr(), q.stride(0), hq, k.data_ptr(), k.stride(0), k.stride(1), None if v is None else v.data_ptr(),
        0 if v is None else v.stride(0), 0 if v is None else v.stride(1), ptrs[0].data_ptr(), ptrs[1].data_ptr(),
        ptrs[2].data_ptr(), ptrs[3].data_ptr(), ptrs[4].data_ptr(), hkv, dh, dv, values[0].stride(1), scale,
        None if sinks is None else sinks.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"attend_batch: bad shapes q {tuple(q.shape)}, positions {pos}, windows from {lo}")
    return out


def quantize_rows_i8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w fp32 [..., N, K] -> (q int8 [..., N, K], s fp32 [..., N]), w ~ q * s[..., None]."""
    s = (w.abs().amax(-1) / 127.0).clamp_min(1e-12)
    return torch.round(w / s[..., None]).clamp(-127, 127).to(torch.int8).contiguous(), s.float().contiguous()


def heads_i8(lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y[t, h, j] = s[h, j] * sum_i x[t, h, i] q[h, j, i]: x fp32 [T, H, K] (K contiguous), q int8 [H, N, K],
    s fp32 [H, N] -> [T, H, N]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, h, k = x.shape
    n = q.shape[1]
    y = torch.empty(t, h, n)
    lib.dk_heads_i8(x.data_ptr(), t, h, k, x.stride(0), x.stride(1), q.data_ptr(), s.data_ptr(), n, y.data_ptr(),
                    torch.get_num_threads())
    return y


def heads_i8_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``heads_i8`` in torch (one einsum over the int8 values, then the scales): the reference, and the
    form compiled graphs trace."""
    return torch.einsum("thk,hnk->thn", x, q.float()) * s


def greedy(lib: ctypes.CDLL, logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """logits fp32 [B, V] (V contiguous) -> (argmax per row, its log_softmax value per row)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    idx, logp = torch.empty(b, dtype=torch.int64), torch.empty(b)
    lib.dk_greedy(logits.data_ptr(), b, v, logits.stride(0), idx.data_ptr(), logp.data_ptr())
    return idx.tolist(), logp.tolist()


def head_rescore(lib: ctypes.CDLL, logits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, r: int) -> bool:
    """logits fp32 [B, V] (V contiguous), in place: each row's r largest (ties: the lower index) become
    x[b] . weight[i] exactly (x fp32 [B, D], weight fp32 or bf16 [V, D], both contiguous). False (logits
    untouched) where the kernel declines: r outside [1, 64], another weight dtype, or a NaN in a row."""
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    b, v = logits.shape
    return lib.dk_head_rescore(logits.data_ptr(), b, v, logits.stride(0), x.data_ptr(), x.stride(0),
                               weight.data_ptr(), int(weight.dtype == torch.bfloat16), weight.shape[1], r) == 0


def router_topk(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, k: int,
                norm: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x fp32 [T, D] (D contiguous), weight fp32 [E, D] contiguous -> (ids int64 [T, k] in descending
    probability, their probabilities fp32 [T, k], renormalised when ``norm``); None when the kernel
    declines the shape (the caller runs the reference)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, d = x.shape
    ids, w = torch.empty(t, k, dtype=torch.int64), torch.empty(t, k)
    if lib.dk_router_topk(x.data_ptr(), t, d, x.stride(0), weight.data_ptr(), weight.shape[0], k, int(norm),
                          ids.data_ptr(), w.data_ptr(), torch.get_num_threads()):
        return None
    return ids, w


def router_logits_topk(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """gpt-oss's router: x fp32 [T, D] (D contiguous), weight fp32 [E, D], bias fp32 [E] or None ->
    (ids int64 [T, k] of the k largest logits, descending, and a softmax over those k, fp32 [T, k]);
    None when the kernel declines the shape."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, d = x.shape
    ids, w = torch.empty(t, k, dtype=torch.int64), torch.empty(t, k)
    if lib.dk_router_logits_topk(x.data_ptr(), t, d, x.stride(0), weight.data_ptr(),
                                 None if bias is None else bias.data_ptr(), weight.shape[0], k, ids.data_ptr(),
                                 w.data_ptr(), torch.get_num_threads()):
        return None
    return ids, w
