"""Random but valid ggml block bytes, for benchmark models and tests: every block's fp16 scale
fields (d, and dmin where the format has one; MXFP4's e8m0 exponent byte) set to a chosen value, the
rest random. gguf-py quantizes only some types (Q8_0, Q4_0, MXFP4 ...); the K-quants and IQ4_XS have
no quantizer there, and a benchmark's weights need not come from floats anyway."""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# byte offsets of the fp16 scale fields in one block
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,)}


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator, scale: float = 2**-10) -> np.ndarray:
    """uint8 [rows, row_bytes] of ``qtype`` blocks; fp16 scales ``scale`` (MXFP4: the nearest power of two)."""
    block, size = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    if qtype == Q.MXFP4:
        raw[:, 0] = 127 + int(round(np.log2(scale)))  # e8m0
    else:
        for off in F16_FIELDS[qtype]:
            raw[:, off:off + 2] = np.array([scale], np.float16).view(np.uint8)
    return raw.reshape(rows, -1)
