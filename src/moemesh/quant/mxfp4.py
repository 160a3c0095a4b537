"""MXFP4 (OCP microscaling FP4), as the published gpt-oss checkpoints store expert matrices.

``NAME_blocks`` uint8 [..., out, G, 16]: 32 e2m1 values per group, two per byte (low nibble
first); ``NAME_scales`` uint8 [..., out, G]: one e8m0 exponent per group (2^(s - 127)). The
dequantization mirrors transformers' integrations/mxfp4.py (``convert_moe_packed_tensors``)
op for op: the nibbles index the same lookup table and ``torch.ldexp`` applies the exponent,
so the values are bit-identical. Unlike it, we keep the [out, in] orientation of a linear
weight and dequantize one expert at a time (a whole gpt-oss-120b layer is never materialised).
"""
from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values per scale


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] in ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    exp = scales.to(torch.int32) - 127  # e8m0 bias
    out = torch.empty(*blocks.shape[:-1], GROUP, dtype=dtype)  # [..., G, 32]
    out[..., 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(blocks >> 4).to(torch.int)]
    torch.ldexp(out, exp.unsqueeze(-1), out=out)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * GROUP)


def dequantize_expert(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One expert's matrix: blocks [out, G, 16], scales [out, G] -> fp32 [out, in = G * 32]."""
    return dequantize(blocks, scales, torch.float32)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A simple MXFP4 quantizer (tests and tiny checkpoints): w [..., K] (K % 32 == 0) ->
    (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]); the group's exponent is the
    smallest that fits its largest magnitude in e2m1's range, values round to the nearest code."""
    *lead, k = w.shape
    if k % GROUP:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {GROUP}, got {k}")
    g = w.float().reshape(*lead, k // GROUP, GROUP)  # [..., G, 32]
    amax = g.abs().amax(-1).clamp(min=2.0**-120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # 6 = largest e2m1 magnitude
    scaled = g / torch.exp2(exp).unsqueeze(-1)
    table = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - table).abs().argmin(-1)  # [..., G, 32] in 0..7
    codes = (codes + 8 * (scaled < 0)).to(torch.uint8)  # sign bit
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


GGUF_BLOCK_BYTES = 1 + GROUP // 2  # GGUF's MXFP4 block: the e8m0 byte, then 16 bytes of nibbles


def to_gguf(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Safetensors layout -> GGUF's, losslessly (same byte count): blocks uint8 [..., G, 16] (byte j =
    values 2j low, 2j+1 high) and scales uint8 [..., G] -> raw uint8 [..., G * 17], each block the
    scale byte then 16 bytes whose low nibbles are values 0..15 and high nibbles values 16..31."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} / scales {tuple(scales.shape)} "
                         f"{scales.dtype}: want uint8 [..., G, 16] and [..., G]")
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., G, 32] in value order
    out = torch.empty(*scales.shape, GGUF_BLOCK_BYTES, dtype=torch.uint8)  # [..., G, 17]
    out[..., 0] = scales
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.flatten(-2)


def from_gguf(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``to_gguf``: raw uint8 [..., G * 17] -> (blocks [..., G, 16], scales [..., G])."""
    g = raw.shape[-1] // GGUF_BLOCK_BYTES
    b = raw.reshape(*raw.shape[:-1], g, GGUF_BLOCK_BYTES)
    codes = torch.cat([b[..., 1:] & 0x0F, b[..., 1:] >> 4], dim=-1)  # [..., G, 32] in value order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), b[..., 0].contiguous()
