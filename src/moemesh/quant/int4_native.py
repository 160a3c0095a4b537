"""Optional C int4 matmul (int4_matmul.c, int4_ffn.c) over torch's own int4 CPU packing, built on first use.

torch's ``_weight_int4pack_mm_for_cpu`` dequantizes every weight to fp32 (two fmas per weight);
the C kernel splits x per (row, group of 32) into two int8 planes (llama.cpp's Q8 plus a
residual plane: ~16-bit activations) and takes exact integer dot products, reading the same ``qweight``
and ``scales_and_zeros`` buffers (no repack, no extra memory, nothing to redo per expert load).
Each build also comes with one plane (``-DI4_X8=1``: llama.cpp's 8-bit activations, half the
multiplies), chosen per process by ``MOEMESH_INT4_ACT=8`` (``activation_bits()``; default 16): faster
on AVX2 CPUs, less accurate (bench/int4_act.py measures both: speed and logits vs fp32).
Three builds of the same sources, one arithmetic, the same bits (int4_kernel.h): ``avx512`` (VNNI +
VBMI), ``avx2`` (+ FMA), ``scalar`` (plain C, any CPU); ``load_native`` picks the best one this CPU
runs (``MOEMESH_INT4_ISA`` forces one). Both of torch's SIMD packings (64-row blocks, written on an
AVX-512 CPU; 32-row blocks, on an AVX2 one) and group 32 are read; callers check ``supports``. Built by
quant/native.py (``cc -O3 -march=native``, cached per source, flags and CPU). No compiler or a failed
build: ``load_native()`` is None and callers keep torch's kernel.
"""
from __future__ import annotations

import ctypes
import math
import os
import subprocess
import warnings
from functools import cache
from pathlib import Path

import torch

from . import int4_experts
from .int4_pack import torch_layout
from .native import BASE_FLAGS, cpu_flags, load_library

HERE = Path(__file__).parent
SOURCES = ("exp_poly.h", "int4_kernel.h", "int4_scalar.h", "int4_avx2.h", "int4_avx512.h", "int4_matmul.c", "int4_ffn.c")
# no fp contraction: the paths' bits depend on which products round before they are added (-std=c11
# already means off for gcc; clang's default would fuse)
FLAGS = (*BASE_FLAGS, "-ffp-contract=off")
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}  # build name -> I4_ISA / i4_isa()
ISA_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512_vnni", "avx512vbmi"), "avx2": ("avx2", "fma"), "scalar": ()}
LAYOUTS = {(64, True): 0, (32, True): 4}  # torch's AVX-512 / AVX2 int4 packing -> its fmt bit (FMT_B32)
GROUP = 32
BLOCK = 64  # rows per block-major scale block (and per AVX-512 weight block)
FMT_SYM, FMT_BLOCKS, FMT_B32 = 1, 2, 4  # the kernels' ``fmt`` bits (int4_kernel.h): symmetric, block-major scales, 32-row weight blocks
ISA_ENV = "MOEMESH_INT4_ISA"
ACT_ENV = "MOEMESH_INT4_ACT"


def cpu_isas() -> list[str]:
    """The builds this CPU runs, best first (from /proc/cpuinfo's flags; plain C everywhere)."""
    return list(_cpu_isas())


@cache  # asked on every int4 call of a decode step (load_native): computed once per process
def _cpu_isas() -> tuple[str, ...]:
    flags = set(cpu_flags().split())
    return tuple(isa for isa in ("avx512", "avx2", "scalar") if all(f in flags for f in ISA_FLAGS[isa]))


@cache
def _load(isa: str, x8: bool) -> ctypes.CDLL | None:
    try:
        lib = load_library(f"int4_matmul_{isa}{'_x8' if x8 else ''}", HERE, SOURCES,
                           [*FLAGS, f"-DI4_ISA={ISAS[isa]}", f"-DI4_X8={int(x8)}"])
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.i4_matmul.argtypes = [p, i32, i64, i64, p, p, i32, i64, p, i32]
    lib.i4_matmul.restype = i32
    int4_experts.declare(lib)  # the fused expert calls' signatures
    lib.i4_isa.restype = i32
    lib.i4_x8.restype = i32
    ok = lib.i4_isa() == ISAS[isa] and lib.i4_x8() == int(x8)
    return lib if ok else None  # the compiler could not target it


def load_variant(isa: str, x8: bool = False) -> ctypes.CDLL | None:
    """The ``isa`` build of the kernels ("scalar", "avx2", "avx512"), with one int8 activation plane when
    ``x8``, or None when this CPU lacks it or it cannot be built. Tests compare the builds on one machine."""
    if isa not in ISAS:
        raise ValueError(f"int4 kernel build {isa!r}: expected one of {sorted(ISAS)}")
    return _load(isa, x8) if isa in _cpu_isas() else None


def activation_bits() -> int:
    """The int4 kernels' activation precision in this process: ``MOEMESH_INT4_ACT`` (8 or 16), 16 by
    default. 8 is faster where a decode step is compute-bound (AVX2 CPUs: 1.2-1.4x per matmul, see
    int4_avx2.h) but not free: SmolLM2's top-1 agreement with fp32 fell from 99.4% to 95.7% and its
    greedy answer to the README's question changed (bench/results/int4_act.md), so it is a choice."""
    return _activation_bits(os.environ.get(ACT_ENV, ""))


@cache  # (asked on every int4 call: the environment is read once per value)
def _activation_bits(env: str) -> int:
    if env in ("8", "16"):
        return int(env)
    if env:
        warnings.warn(f"{ACT_ENV}={env!r}: expected 8 or 16; using the default", RuntimeWarning, stacklevel=4)
    return 16


def load_native() -> ctypes.CDLL | None:
    """The kernel library, or None when disabled (MOEMESH_INT4_NATIVE=0) or unavailable. The best build
    for this CPU, or the one MOEMESH_INT4_ISA names (None, with a warning, if this CPU lacks it), at
    ``activation_bits()``."""
    if os.environ.get("MOEMESH_INT4_NATIVE", "1") == "0":
        return None
    isa = os.environ.get(ISA_ENV) or _cpu_isas()[0]
    lib = load_variant(isa, activation_bits() == 8)
    if lib is None and isa not in _cpu_isas():
        _warn_missing(isa)
    return lib


def _warn_missing(isa: str) -> None:
    warnings.warn(f"{ISA_ENV}={isa}: this CPU lacks it ({', '.join(cpu_isas())} available); "
                  "using torch's int4 kernel", RuntimeWarning, stacklevel=3)


def supports(layout: tuple[int, bool] | None, group_size: int, in_features: int) -> bool:
    """Whether the kernels read this packing: torch's AVX-512 or AVX2 layout, group 32."""
    return layout in LAYOUTS and group_size == GROUP and in_features % GROUP == 0


def layout_fmt(layout: tuple[int, bool] | None) -> int:
    """The ``fmt`` bit of a supported packing (FMT_B32 for torch's AVX2 32-row blocks, else 0)."""
    return LAYOUTS.get(layout, 0) if layout is not None else 0


def is_symmetric(scales: torch.Tensor) -> bool:
    """Symmetric int4 (scales alone, bf16 [K/32, N_pad]) vs (scale, zero) pairs [K/32, N_pad, 2]."""
    return scales.dim() == 2


def block_scales(sz: torch.Tensor) -> torch.Tensor:
    """torch's scale layout, bf16 [G, N_pad] or [G, N_pad, 2], -> the kernels' block-major layout, 1-D:
    per 64-row weight block (the short tail block last) its [G, width(, 2)] scales in one run, so a
    block's scales stream beside its weights instead of N_pad entries apart per group (int4_kernel.h;
    measured here: trunk-shaped matmuls +17-30%, experts +15%, 2 threads, huge pages)."""
    g, n_pad = sz.shape[:2]
    s = sz.reshape(g, n_pad, -1)  # [G, N_pad, sw]
    nfull = n_pad // BLOCK * BLOCK
    full = s[:, :nfull].reshape(g, nfull // BLOCK, BLOCK, s.shape[2]).permute(1, 0, 2, 3)  # [B, G, 64, sw]
    return torch.cat([full.reshape(-1), s[:, nfull:].reshape(-1)])  # tail [G, tail, sw] is already in order


def unblock_scales(flat: torch.Tensor, g: int, n_pad: int, sym: bool) -> torch.Tensor:
    """Inverse of block_scales: 1-D block-major -> torch's [G, N_pad] (sym) or [G, N_pad, 2] (a new tensor)."""
    sw, nfull = 1 if sym else 2, n_pad // BLOCK * BLOCK
    full = flat[: g * nfull * sw].view(nfull // BLOCK, g, BLOCK, sw).permute(1, 0, 2, 3).reshape(g, nfull, sw)
    out = torch.cat([full, flat[g * nfull * sw :].view(g, n_pad - nfull, sw)], 1)  # [G, N_pad, sw]
    return out.reshape(g, n_pad) if sym else out


def int4_matmul(lib: ctypes.CDLL, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                fmt: int | None = None) -> torch.Tensor:
    """x fp32/bf16 [M, K] @ W.T -> fp32 [M, N_pad]; qweight uint8 [N_pad, K/2] (torch's AVX-512 int4
    packing, or its AVX2 one with ``fmt`` & FMT_B32), scales bf16 [K/32, N_pad, 2] (scale, zero) or
    [K/32, N_pad] (symmetric); with ``fmt`` & FMT_BLOCKS, 1-D in block_scales' layout (fmt None: torch's
    scale layout, sym from the rank, the packing torch writes on this machine)."""
    m, k = x.shape
    n_pad = qweight.shape[0]
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x = x.contiguous()
    fmt = (int(is_symmetric(scales)) | layout_fmt(torch_layout())) if fmt is None else fmt
    want = (k // GROUP, n_pad, 2)[: 2 if fmt & FMT_SYM else 3]
    shape_ok = (scales.numel() == math.prod(want) and scales.dim() == 1 if fmt & FMT_BLOCKS
                else tuple(scales.shape) == want)
    if scales.dtype != torch.bfloat16 or not shape_ok or not qweight.is_contiguous() or not scales.is_contiguous():
        raise ValueError("int4_matmul: qweight/scales do not match x or are not contiguous bf16")
    y = torch.empty(m, n_pad)
    rc = lib.i4_matmul(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, qweight.data_ptr(),
                       scales.data_ptr(), fmt, n_pad, y.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"int4_matmul: kernel rejected M={m}, K={k}, N={n_pad}")
    return y


def reference_int4_matmul(x: torch.Tensor, qweight_q: torch.Tensor, scales_and_zeros: torch.Tensor,
                          x8: bool = False) -> torch.Tensor:
    """The kernel's arithmetic in torch, for tests: x [M, K], q uint8 [N, K] (unpacked 0..15),
    sz bf16 [K/32, N, 2] -> fp32 [M, N]; ``x8``: the one-plane build's (x2 = 0). The integer dots are
    exact; the fp32 steps round like the kernel's but are summed over groups in another order (compare
    within a tolerance)."""
    xf = x.float()
    m, k = xf.shape
    g = k // GROUP
    xg = xf.view(m, g, GROUP)  # [M, G, 32]
    amax = xg.abs().amax(-1, keepdim=True)  # [M, G, 1]
    t = xg * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # |t| <= 127
    x1 = torch.round(t)  # round half even, like cvtps2dq
    x2 = torch.zeros_like(x1) if x8 else torch.round((t - x1) * 256).clamp(max=127)
    xx = (256 * x1 + x2).to(torch.int64)  # [M, G, 32]
    du, sumx = (amax / 127.0 / 256.0).squeeze(-1), xg.sum(-1)  # [M, G]
    qc = qweight_q.to(torch.int64).view(-1, g, GROUP) - 8  # [N, G, 32]
    dots = torch.einsum("mgk,ngk->mng", xx, qc).float()  # [M, N, G] exact integers (< 2^24)
    s, z = scales_and_zeros.float().permute(2, 1, 0)  # [N, G]
    return (dots * (s[None] * du[:, None]) + z[None] * sumx[:, None]).sum(-1)  # [M, N]
