"""Optional C kernels for TurboQuant (tq_attend.c, tq_encode.c), built on first use.

The torch path materialises every decoded coordinate each step (a gather per coordinate and
several passes over [Hkv, N, Dh] tensors) and pays per-op overhead on tiny tensors; the C decode
step streams the packed words once, keeps the rest in cache, and does the window update and the
eviction encode in the same call. Plain C, no torch headers: ``cc`` builds it in about a second
into ``$MOEMESH_CACHE_DIR`` (default ~/.cache/moemesh/native), keyed by a hash of the sources,
flags and this CPU's feature flags (it is built with -march=native). No compiler, a failed build,
or ``MOEMESH_TQ_NATIVE=0``: ``load_native()`` returns None and the cache uses the torch path.
``MOEMESH_TQ_CFLAGS`` adds compiler flags (the tests build the portable loops with -mno-avx512f).
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import torch

from ..quant.native import BASE_FLAGS, load_library
from .packing import BitLayout

HERE = Path(__file__).parent
SOURCES = ("tq_native.h", "tq_attend.c", "tq_encode.c")
FLAGS = BASE_FLAGS
MAX_GROUP, MAX_DIM, MAX_GROUPS = 16, 256, 2  # must match tq_native.h


class CodedView(ctypes.Structure):
    """coded_t in tq_native.h: one layer of one sequence as the kernels see it."""

    _fields_ = [("kw", ctypes.c_void_p), ("vw", ctypes.c_void_p), ("kn", ctypes.c_void_p), ("vn", ctypes.c_void_p),
                ("head_stride", ctypes.c_int64), ("ws", ctypes.c_int64), ("norm_stride", ctypes.c_int64),
                ("rt", ctypes.c_void_p), ("groups", ctypes.c_void_p), ("ng", ctypes.c_int),
                ("tables", ctypes.c_void_p), ("bounds", ctypes.c_void_p)]


def _flags() -> list[str]:
    return [*FLAGS, *os.environ.get("MOEMESH_TQ_CFLAGS", "").split()]


def load_native() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is disabled or cannot be built."""
    if os.environ.get("MOEMESH_TQ_NATIVE", "1") == "0":
        return None
    try:
        lib = load_library("tq_native", HERE, SOURCES, _flags())
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tq_decode_step.argtypes = [p, i32, i32, i32, p, ctypes.c_float, p, p, p, p, i64, i64, i64, i64, i64, i64, p, p, i32]
    lib.tq_decode_step.restype = i32
    lib.tq_encode.argtypes = [p, i32, i64, i32, p, i64]
    lib.tq_encode.restype = None
    return lib


class NativeTables:
    """A quantizer's layout and codebooks in the kernels' terms: groups int32 [G, 5] {first
    coordinate, count, bits, word of plane 0, word of plane 1}, centroid tables float32 [G, 16]
    (each repeated to 16 entries so index bits above b need no masking), boundaries [G, 15]."""

    def __init__(self, layout: BitLayout, codebooks: list) -> None:
        rows, coord = [], 0
        planes = {(pl.group, pl.shift): pl for pl in layout.planes}
        for gi, (n, bits) in enumerate(layout.groups):
            p1 = planes.get((gi, 2)) if bits == 3 else None
            rows.append([coord, n, bits, planes[(gi, 0)].word_lo, p1.word_lo if p1 else -1])
            coord += n
        self.groups = torch.tensor(rows, dtype=torch.int32)
        self.tables = torch.stack([cb.centroids.repeat(16 // cb.centroids.numel()) for cb in codebooks])
        self.bounds = torch.stack([torch.cat([cb.boundaries, cb.boundaries.new_zeros(16 - cb.centroids.numel())])
                                   for cb in codebooks])

    @staticmethod
    def supports(layout: BitLayout, dim: int) -> bool:
        return dim <= MAX_DIM and len(layout.groups) <= MAX_GROUPS and all(b <= 4 for _, b in layout.groups)

    def view(self, k_codes, v_codes, k_norms, v_norms, rt: torch.Tensor) -> CodedView:
        """The C struct over one layer's buffers (k/v_codes int32 [Hkv, words, cap], norms
        float16 [Hkv, cap], rotation [d, d]); the tensors must outlive it."""
        if not (k_codes.stride() == v_codes.stride() and k_codes.stride(2) == 1 and k_norms.stride() == v_norms.stride()
                and k_norms.stride(1) == 1 and rt.is_contiguous()):
            raise ValueError("code/norm buffers must share a layout with unit token stride")
        return CodedView(k_codes.data_ptr(), v_codes.data_ptr(), k_norms.data_ptr(), v_norms.data_ptr(),
                         k_codes.stride(0), k_codes.stride(1), k_norms.stride(0), rt.data_ptr(),
                         self.groups.data_ptr(), self.groups.shape[0], self.tables.data_ptr(), self.bounds.data_ptr())


def decode_step(lib: ctypes.CDLL, view: CodedView, q: torch.Tensor, scale: float, k_new: torch.Tensor,
                v_new: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, nw: int, window: int, lo: int, coded: int,
                e0: int) -> tuple[torch.Tensor, int]:
    """One token: q [Hq, Dh], k_new/v_new [Hkv, Dh] (appended to the window buffers wk/wv
    [Hkv, cap, Dh] after their nw tokens) -> (attention output [Hq, Dh], tokens evicted into codes).
    Attends over codes of [lo, coded) and window entries [e0, nw + 1); see tq_attend.c."""
    hq, d = q.shape
    hkv, wcap = wk.shape[0], wk.shape[1]
    if not all(t.is_contiguous() for t in (q, k_new, v_new, wk, wv)):
        raise ValueError("decode_step needs contiguous tensors")
    nc = max(0, coded - lo)
    out = torch.empty(hq, d)
    scratch = torch.empty(hq * (nc + nw + 1 - e0) + 2 * hkv * nc + 2 * hq * d)
    evicted = lib.tq_decode_step(ctypes.byref(view), hq, hkv, d, q.data_ptr(), scale, k_new.data_ptr(), v_new.data_ptr(),
                                 wk.data_ptr(), wv.data_ptr(), wcap, nw, window, lo, coded, e0,
                                 scratch.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if evicted < 0:
        raise ValueError(f"native TurboQuant kernel rejected the shapes (Hq/Hkv <= {MAX_GROUP}, Dh <= {MAX_DIM})")
    return out, evicted


def encode(lib: ctypes.CDLL, view: CodedView, x: torch.Tensor, t0: int, capacity: int) -> None:
    """Encode x [2 (k, v), Hkv, e, Dh] into token columns [t0, t0 + e) of the viewed buffers."""
    _, hkv, e, d = x.shape
    if t0 + e > capacity:
        raise ValueError("encode past the buffers' capacity")
    x = x.float().contiguous()
    lib.tq_encode(ctypes.byref(view), hkv, e, d, x.data_ptr(), t0)
