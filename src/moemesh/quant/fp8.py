"""FP8 e4m3 weights with 128x128 block scales (DeepSeek-V3/R1's ``weight_scale_inv``), as block rows.

Checkpoints store ``weight`` float8_e4m3fn [N, K] and ``weight_scale_inv`` fp32 [ceil(N/128), ceil(K/128)]:
W[n, k] = float(weight[n, k]) * scale_inv[n // 128, k // 128] (transformers' finegrained_fp8
``_dequantize_fp8_weight``). Our raw layout, ``FP8_E4M3_B128``, makes every row independent like a GGUF
row so rows can be sliced and concatenated: per row, ceil(K/128) blocks of 132 bytes, each the block's
fp32 scale (4 bytes, little endian, the scale of this row's 128-row band) then its 128 e4m3 bytes
(the last block zero-padded past K; e4m3 0x00 is +0). 132/128 bytes per weight: 3% over the file.
"""
from __future__ import annotations

import torch

QTYPE = "FP8_E4M3_B128"
BLOCK = 128  # weights per block (and rows per scale band)
TYPE_SIZE = 4 + BLOCK  # fp32 scale + 128 e4m3 bytes


def row_bytes(k: int) -> int:
    return -(-k // BLOCK) * TYPE_SIZE


def pack(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """weight e4m3 (float8_e4m3fn or its uint8 bits) [N, K], scale_inv [ceil(N/128), ceil(K/128)]
    (fp32, or any float dtype such as UE8M0, widened exactly) -> raw uint8 [N, ceil(K/128) * 132]."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    nb = -(-k // BLOCK)
    if tuple(scale_inv.shape) != (-(-n // BLOCK), nb):
        raise ValueError(f"FP8 weight_scale_inv {tuple(scale_inv.shape)} does not match weight {(n, k)}: "
                         f"want {(-(-n // BLOCK), nb)} (128x128 blocks)")
    bits = weight.view(torch.uint8) if weight.dtype != torch.uint8 else weight
    out = torch.zeros(n, nb, TYPE_SIZE, dtype=torch.uint8)  # [N, nb, 132]
    padded = torch.zeros(n, nb * BLOCK, dtype=torch.uint8)
    padded[:, :k] = bits
    out[:, :, 4:] = padded.view(n, nb, BLOCK)
    rows = scale_inv.float().repeat_interleave(BLOCK, dim=0)[:n].contiguous()  # [N, nb] fp32
    out[:, :, :4] = rows.view(torch.uint8).view(n, nb, 4)
    return out.view(n, nb * TYPE_SIZE)


def unpack(raw: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw uint8 [N, nb * 132] -> (e4m3 bits uint8 [N, K], per-row block scales fp32 [N, nb])."""
    n = raw.shape[0]
    nb = raw.shape[1] // TYPE_SIZE
    blocks = raw.reshape(n, nb, TYPE_SIZE)
    scales = blocks[:, :, :4].contiguous().view(torch.float32).view(n, nb)
    return blocks[:, :, 4:].reshape(n, nb * BLOCK)[:, :k], scales


def dequantize(raw: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: fp32 [N, K], each weight float(e4m3) * its block's scale (one rounding, as
    transformers' ``_dequantize_fp8_weight`` does in fp32)."""
    bits, scales = unpack(raw, k)
    w = bits.contiguous().view(torch.float8_e4m3fn).float()  # [N, K], exact
    return w * scales.repeat_interleave(BLOCK, dim=1)[:, :k]


def pack_in_place(buf: torch.Tensor, out_at: int, src_at: int, n: int, k: int, scale_inv: torch.Tensor,
                  chunk_bytes: int = 1 << 20) -> None:
    """Pack the e4m3 rows at ``buf[src_at : src_at + n*k]`` (uint8 [N, K], as a checkpoint stores them)
    into ``buf[out_at : out_at + n * row_bytes(k)]``: the bytes ``pack`` gives, without a buffer the size
    of the weight (lazy experts read from an FP8 file: the slot holds the reads, then their packed rows).

    Rows go forward in chunks of whole 128-row bands, each written at or below the source rows still
    to come (needs ``out_at + n * row_bytes(k) <= src_at + n * k``); a chunk whose rows overlap its own
    source is taken from a copy of that chunk (at most ``chunk_bytes``)."""
    rb, nb, full = row_bytes(k), -(-k // BLOCK), k // BLOCK
    rem = k - full * BLOCK
    if out_at + n * rb > src_at + n * k:
        raise ValueError(f"packed rows [{out_at}, {out_at + n * rb}) would overtake their source ending at {src_at + n * k}")
    if tuple(scale_inv.shape) != (-(-n // BLOCK), nb):
        raise ValueError(f"FP8 weight_scale_inv {tuple(scale_inv.shape)} does not match weight {(n, k)}")
    step = max(1, chunk_bytes // (rb * BLOCK)) * BLOCK  # rows per chunk: whole scale bands
    for r in range(0, n, step):
        c = min(step, n - r)
        src = buf[src_at + r * k : src_at + (r + c) * k]
        dst_at = out_at + r * rb
        if dst_at + c * rb > src_at + r * k:
            src = src.clone()  # the chunk's packed rows would overwrite its own source
        src, out = src.view(c, k), buf[dst_at : dst_at + c * rb].view(c, nb, TYPE_SIZE)
        if full:
            out[:, :full, 4:].copy_(src[:, : full * BLOCK].view(c, full, BLOCK))
        if rem:
            out[:, full, 4 : 4 + rem].copy_(src[:, full * BLOCK :])
            out[:, full, 4 + rem :].zero_()  # e4m3 +0 past K, as pack pads
        bands = scale_inv[r // BLOCK : -(-(r + c) // BLOCK)].float()
        rows = bands.repeat_interleave(BLOCK, dim=0)[:c].contiguous()  # r is a band start
        out[:, :, :4].copy_(rows.view(torch.uint8).view(c, nb, 4))
