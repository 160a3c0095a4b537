"""Optional native kernel for TurboQuant decode attention (tq_native.c), built on first use.

The torch path has to materialise every decoded coordinate (a gather per coordinate per step,
several passes over [Hkv, N, Dh] int32/float tensors); the C kernel streams the packed words
once per step and keeps everything else in cache. It is plain C with no torch headers: ``cc``
builds it in about a second into ``$MOEMESH_CACHE_DIR`` (default ~/.cache/moemesh/native), keyed
by a hash of the source, the compiler flags and this CPU's feature flags (-march=native). No
compiler, a failed build, or ``MOEMESH_TQ_NATIVE=0`` -> ``load_native()`` returns None and the
cache uses the torch path, which computes the same thing.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .packing import BitLayout

SOURCE = Path(__file__).with_name("tq_native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
MAXP, DESC = 3, 14  # must match tq_native.c
MAX_GROUP, MAX_DIM, TABLE = 16, 256, 32


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _library_path(source: str) -> Path:
    root = Path(os.environ.get("MOEMESH_CACHE_DIR", Path.home() / ".cache" / "moemesh")) / "native"
    key = hashlib.sha256("\0".join([source, " ".join(FLAGS), _cpu_flags()]).encode()).hexdigest()[:16]
    return root / f"tq_native_{key}.so"


def _build(source: str, target: Path) -> None:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise OSError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "tq_native.c", Path(tmp) / target.name
        src.write_text(source)
        subprocess.run([cc, *FLAGS, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(lib, target)  # atomic: concurrent builders never see half a library


def load_native() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is disabled or cannot be built."""
    if os.environ.get("MOEMESH_TQ_NATIVE", "1") == "0":
        return None
    try:
        source = SOURCE.read_text()
        path = _library_path(source)
        if not path.exists():
            _build(source, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tq_decode_attend.argtypes = [i32, i32, i32, p, p, p, p, i64, i64, i64, i64, p, p, i64, p, p, i64, p, p, p, p]
    lib.tq_decode_attend.restype = ctypes.c_int
    lib.tq_pack.argtypes = [p, i32, i64, i32, p, p, p, p, p, i64, i64, i64]
    lib.tq_pack.restype = None
    return lib


def coord_descriptors(layout: BitLayout, table_offsets: list[int]) -> torch.Tensor:
    """int32 [d, DESC]: per coordinate {nplanes, table base, (word, bit, mask, shift) * MAXP}."""
    desc = torch.zeros(layout.dim, DESC, dtype=torch.int32)
    used = [0] * layout.dim
    for pl in layout.planes:
        for i in range(pl.count):
            j = pl.coord_lo + i
            k = used[j]
            desc[j, 2 + 4 * k : 6 + 4 * k] = torch.tensor(
                [pl.word_lo + i // pl.per_word, (i % pl.per_word) * pl.width, (1 << pl.width) - 1, pl.shift]
            )
            used[j] += 1
            desc[j, 0] = used[j]
            desc[j, 1] = table_offsets[pl.group]
    if max(used) > MAXP:
        raise ValueError(f"codes wider than {MAXP} planes")
    return desc


def padded_table(table: torch.Tensor) -> torch.Tensor | None:
    """The centroid table zero-padded to the kernel's TABLE entries; None if it is longer
    (codes of 5+ bits), which the kernel does not take."""
    if table.numel() > TABLE:
        return None
    return torch.cat([table, table.new_zeros(TABLE - table.numel())])


def boundary_descriptors(sizes: list[int], boundaries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(all groups' boundaries concatenated float32, int32 [d, 2] {offset, count} per coordinate)."""
    offsets = [0]
    for b in boundaries[:-1]:
        offsets.append(offsets[-1] + b.numel())
    rows = [[off, b.numel()] for n, off, b in zip(sizes, offsets, boundaries) for _ in range(n)]
    return torch.cat(boundaries).contiguous(), torch.tensor(rows, dtype=torch.int32)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def decode_attend(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    rt: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    lo: int,
    nc: int,
    k_norms: torch.Tensor,
    v_norms: torch.Tensor,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    table: torch.Tensor,
    desc: torch.Tensor,
) -> torch.Tensor:
    """q [Hq, Dh] (scaled) attends over coded tokens [lo, lo + nc) of k/v_codes [Hkv, words, cap]
    (norms float16 [Hkv, cap]) and exact_k/v [Hkv, Ne, Dh] -> [Hq, Dh].
    table: ``padded_table`` of the quantizer's table; desc: ``coord_descriptors``."""
    hq, d = q.shape
    hkv, ne = exact_k.shape[0], exact_k.shape[1]
    if not (k_codes.stride(2) == 1 and k_codes.stride() == v_codes.stride() and k_norms.stride() == v_norms.stride()):
        raise ValueError("code/norm buffers must share a layout with unit token stride")
    if not all(t.is_contiguous() for t in (q, rt, exact_k, exact_v, table, desc)) or k_norms.stride(1) != 1:
        raise ValueError("native kernel inputs must be contiguous")
    out = torch.empty(hq, d)
    scratch = torch.empty(hq * (nc + ne) + 2 * nc)
    rc = lib.tq_decode_attend(
        hq, hkv, d, _ptr(q), _ptr(rt), _ptr(k_codes), _ptr(v_codes), k_codes.stride(0), k_codes.stride(1),
        lo, nc, _ptr(k_norms), _ptr(v_norms), k_norms.stride(0), _ptr(exact_k), _ptr(exact_v), ne,
        _ptr(table), _ptr(desc), _ptr(scratch), _ptr(out),
    )
    if rc != 0:
        raise ValueError(f"native TurboQuant kernel rejected the shapes (Hq/Hkv <= {MAX_GROUP}, Dh <= {MAX_DIM})")
    return out


def pack_into(
    lib: ctypes.CDLL,
    y: torch.Tensor,
    bounds: torch.Tensor,
    bdesc: torch.Tensor,
    desc: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    t0: int,
) -> None:
    """Quantize and pack rotated unit vectors y [2 (k, v), Hkv, e, Dh] into token columns
    [t0, t0 + e) of k/v_codes [Hkv, words, cap] (what quantize + BitLayout.pack compute)."""
    _, hkv, e, d = y.shape
    if not y.is_contiguous() or k_codes.stride() != v_codes.stride() or k_codes.stride(2) != 1:
        raise ValueError("pack_into needs contiguous y and unit token stride")
    if t0 + e > k_codes.shape[2]:
        raise ValueError("pack_into past the buffer's capacity")
    lib.tq_pack(
        _ptr(y), hkv, e, d, _ptr(bounds), _ptr(bdesc), _ptr(desc), _ptr(k_codes), _ptr(v_codes),
        k_codes.stride(0), k_codes.stride(1), t0,
    )
