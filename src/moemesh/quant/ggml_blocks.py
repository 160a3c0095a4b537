"""Decoding GGML block formats into float32 numpy arrays (and int4 groups for Q4_0/Q4_1).

`raw` is the array GGUFReader gives for a tensor: typed elements for float/int types, or a uint8
array shaped [..., row_bytes] for block-quantized ones. `shape` is the element shape in numpy
order (GGUF dims reversed, so a weight is [out, in]). Common formats are unpacked here with
vectorised numpy; the K-quants and the rest go through `gguf.quants.dequantize`, which our tests
check against hand-built blocks. Everything stays numpy (torch's small CPU ops were ~10x slower
here); the caller wraps the result with torch.from_numpy, which does not copy.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

QK4 = 32  # elements per Q4_0/Q4_1/Q8_0 block
_Q4_BLOCK_BYTES = {Q.Q4_0: 2 + 16, Q.Q4_1: 2 + 2 + 16}
_Q8_0_BLOCK_BYTES = 2 + 32
_INT_TYPES = (Q.I8, Q.I16, Q.I32, Q.I64, Q.F64)


def is_int4(ggml_type: Q) -> bool:
    """True for the formats `int4_groups` can unpack."""
    return ggml_type in _Q4_BLOCK_BYTES


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    # blocks: [..., n_blocks, block_bytes] -> [..., n_blocks] float32 read from 2 bytes at `start`
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(np.float32)


def int4_groups(raw: np.ndarray, ggml_type: Q, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpack Q4_0/Q4_1 into (q uint8 [..., n] in 0..15, scale f32 [..., n//32], minv f32 [..., n//32]).

    The value of element i is q[i] * scale[i // 32] + minv[i // 32]: Q4_1 stores (d, m) directly;
    Q4_0 is d * (q - 8), i.e. scale d and minv -8d (exact in float32: d is an fp16).
    """
    block_bytes = _Q4_BLOCK_BYTES[ggml_type]
    n = shape[-1]
    lead = tuple(shape[:-1])
    blocks = np.asarray(raw, dtype=np.uint8).reshape(*lead, n // QK4, block_bytes)  # [..., G, bytes]
    scale = _f16_field(blocks, 0)  # [..., G]
    if ggml_type == Q.Q4_1:
        minv = _f16_field(blocks, 2)
    else:
        minv = scale * np.float32(-8.0)
    packed = blocks[..., block_bytes - 16:]  # [..., G, 16]; low nibbles are elements 0..15, high 16..31
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(*lead, n)  # [..., n] uint8
    return q, scale, np.ascontiguousarray(minv)


def int4_to_float(q: np.ndarray, scale: np.ndarray, minv: np.ndarray) -> np.ndarray:
    """q * scale + minv in float32, each scale/minv repeated over its group of 32 along the last dim."""
    grouped = q.reshape(*q.shape[:-1], -1, QK4).astype(np.float32)  # [..., G, 32]
    out = grouped * scale[..., None] + minv[..., None]
    return out.reshape(q.shape)


def _q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, _Q8_0_BLOCK_BYTES)  # [B, 34]
    d = _f16_field(blocks, 0)[:, None]  # [B, 1]
    x = blocks[:, 2:].view(np.int8).astype(np.float32)  # [B, 32]
    return (x * d).reshape(shape)


def _bf16(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # bf16 is the top half of an f32: widen the bit pattern, then reinterpret
    bits = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def dequantize(raw: np.ndarray, ggml_type: Q, shape: tuple[int, ...]) -> np.ndarray:
    """A fresh (writable, not the mmap) float32 array of `shape` (numpy order) decoded from `raw`.

    Raises NotImplementedError for a format neither we nor the gguf package can decode.
    """
    if ggml_type == Q.F32:
        out = np.array(raw, dtype=np.float32).reshape(shape)  # copy: never hand out the mmap
    elif ggml_type == Q.F16 or ggml_type in _INT_TYPES:
        out = np.asarray(raw).astype(np.float32).reshape(shape)
    elif ggml_type == Q.BF16:
        out = _bf16(raw, shape)
    elif ggml_type == Q.Q8_0:
        out = _q8_0(raw, shape)
    elif is_int4(ggml_type):
        out = int4_to_float(*int4_groups(raw, ggml_type, shape))
    else:
        out = np.ascontiguousarray(gguf_quants.dequantize(np.asarray(raw), ggml_type), dtype=np.float32)
        out = out.reshape(shape)
    return out
