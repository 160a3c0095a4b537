"""Random but valid block rows for every BlockLinear qtype (tests and benchmarks).

Types with a quantizer in gguf.quants (Q4_0, Q4_1, Q8_0, MXFP4) quantize random normal weights; the
K-quants and IQ4_XS are random bytes with their fp16 scale fields overwritten by sane values (the bytes
of every other field are all valid codes); FP8 is random e4m3 bytes (NaN codes replaced) with random
positive block scales.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from moemesh.quant import fp8
from moemesh.quant.blocks import block_size, row_bytes

QUANTIZED = ("Q4_0", "Q4_1", "Q8_0", "MXFP4")
# byte offsets of the fp16 super-block fields (d, dmin) inside one block; d scales ~1e-3..1e-2
FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,)}


def random_rows(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, row_bytes(qtype, k)] of valid blocks."""
    rng = np.random.default_rng(seed)
    if qtype == fp8.QTYPE:
        bits = rng.integers(0, 256, size=(n, k), dtype=np.uint8)
        bits[(bits & 0x7F) == 0x7F] = 0x3C  # e4m3fn NaN -> 1.5
        scales = torch.from_numpy(rng.uniform(1e-3, 1e-2, size=(-(-n // 128), -(-k // 128))).astype(np.float32))
        return fp8.pack(torch.from_numpy(bits), scales)
    if qtype in QUANTIZED:
        w = rng.standard_normal((n, k)).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(gguf_quants.quantize(w, GGMLQuantizationType[qtype])))
    block, size = block_size(qtype)
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = rng.uniform(1e-3, 1e-2, size=(n, k // block)).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n, k // block, 2)
    return torch.from_numpy(raw.reshape(n, row_bytes(qtype, k)))
