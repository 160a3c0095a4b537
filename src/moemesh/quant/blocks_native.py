"""The block-format C kernels (blocks_matmul.c, blocks_ffn.c), built on first use by quant/native.py.

Two builds of the same sources: the fast one (``-march=native``: AVX2 + FMA + F16C paths where the CPU
has them) and the portable scalar one (``-DBK_SCALAR``), which must give the same bits (tests compare
them). ``MOEMESH_BLOCKS_NATIVE=0`` turns the kernels off (BlockLinear then runs its torch reference),
``MOEMESH_BLOCKS_NATIVE=scalar`` picks the scalar build (read per call, one lookup). No compiler or a failed build: ``load_native()``
is None.
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
SOURCES = ("exp_poly.h", "blocks_kernel.h", "blocks_unpack.h", "blocks_dot.h", "blocks_unpack_avx2.h", "blocks_fp8.h", "blocks_tile.h", "blocks_v512.h",
           "blocks_matmul.c", "blocks_ffn.c")
# no fma contraction: the scalar and the AVX2 builds must do the same roundings (blocks_kernel.h)
FLAGS = (*BASE_FLAGS, "-ffp-contract=off", "-fno-math-errno")
TYPE_IDS = {"MXFP4": 0, "Q8_0": 1, "Q4_0": 2, "Q4_1": 3, "Q2_K": 4, "Q3_K": 5, "Q4_K": 6, "Q5_K": 7, "Q6_K": 8,
            "IQ4_XS": 9, "FP8_E4M3_B128": 10}
ACT_IDS = {"silu": 0, "gpt_oss_swiglu": 1}


@lru_cache(maxsize=2)
def load_build(scalar: bool) -> ctypes.CDLL | None:
    """One build of the library (scalar: the portable C paths only), or None when it cannot be built."""
    flags = [*FLAGS, "-DBK_SCALAR"] if scalar else list(FLAGS)
    try:
        lib = load_library("blocks_scalar" if scalar else "blocks", HERE, SOURCES, flags)
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.bk_simd.restype = i32
    lib.bk_matmul.argtypes = [i32, p, i64, i64, p, i64, i64, p, p, i32]
    lib.bk_matmul.restype = i32
    lib.bk_act.argtypes = [i32, f32, f32, p, i64, i64, p]
    lib.bk_act.restype = i32
    lib.bk_experts_mix.argtypes = [i32, i32, i32, f32, f32, p, i64, i64, i64, p, p, p, p, i64, i64, p, p, i32]
    lib.bk_experts_mix.restype = i32
    return lib


def load_native() -> ctypes.CDLL | None:
    """The library BlockLinear uses, or None (disabled by MOEMESH_BLOCKS_NATIVE=0, or unavailable)."""
    mode = os.environ.get("MOEMESH_BLOCKS_NATIVE", "1")
    return None if mode == "0" else load_build(mode == "scalar")


def check_rc(rc: int, what: str) -> None:
    if rc == -3:
        raise MemoryError(f"{what}: out of memory")
    if rc:
        raise ValueError(f"{what}: the kernel rejected its arguments (rc {rc})")


def matmul(lib: ctypes.CDLL, qtype: str, x: torch.Tensor, raw: torch.Tensor, in_features: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x fp32 [M, K] @ W.T (+ bias) -> fp32 [M, N]; raw uint8 [N, row_bytes] (rows may be a strided view)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m, n = x.shape[0], raw.shape[0]
    y = torch.empty(m, n)
    if m == 0 or n == 0:
        return y
    rc = lib.bk_matmul(TYPE_IDS[qtype], x.data_ptr(), m, in_features, raw.data_ptr(), raw.stride(0), n,
                       None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    if rc:
        check_rc(rc, f"{qtype} matmul [{m}, {in_features}] x [{n}, {in_features}]")
    return y


def activation(lib: ctypes.CDLL, act: str, h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The gated activation on [gate | up] rows: h fp32 [M, 2I] -> [M, I] (blocks_ffn.c ``bk_act``):
    silu(g) * u, or gpt-oss's clamped SwiGLU (u + 1) * g * sigmoid(alpha g), g <= limit, |u| <= limit."""
    h = h.float().contiguous()
    m, i = h.shape[0], h.shape[1] // 2
    out = torch.empty(m, i)
    check_rc(lib.bk_act(ACT_IDS[act], alpha, limit, h.data_ptr(), m, i, out.data_ptr()), f"activation {act}")
    return out
