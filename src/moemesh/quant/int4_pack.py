"""torch's CPU int4 packing, read back: row padding and unpacking (QuantLinear's dequantized
weights, tests, and the synthetic benchmark's packer checks)."""
from __future__ import annotations

from functools import lru_cache

import torch


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim 0 of t up to ``rows``."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def unpack_int4(packed: torch.Tensor, n: int, k: int, block_n: int, halves: bool) -> torch.Tensor:
    """Inverse of _convert_weight_to_int4pack_for_cpu: packed uint8 [n, k/2] -> q uint8 [n, k].

    The packer walks blocks of ``block_n`` rows (64 on AVX-512, 32 otherwise), each stored as
    [k, block_n/2] bytes; in a full block byte j holds rows j (low nibble) and j + block_n/2
    (``halves``) or rows 2j, 2j+1 (plain build); a short tail block always uses pairs.
    Nibbles are written straight into their transposed place (out=) to save copies.
    """
    flat = packed.reshape(-1)
    q = torch.empty(n, k, dtype=torch.uint8)
    nfull, half = n // block_n, block_n // 2
    if nfull:
        b = flat[: nfull * k * half].view(nfull, k, half)
        dst = q[: nfull * block_n].view(nfull, 2, half, k) if halves else \
            q[: nfull * block_n].view(nfull, half, 2, k).transpose(1, 2)  # [nfull, 2, half, k]
        torch.bitwise_and(b, 15, out=dst[:, 0].transpose(1, 2))
        torch.bitwise_right_shift(b, 4, out=dst[:, 1].transpose(1, 2))
    tail = n - nfull * block_n
    if tail:
        b = flat[nfull * k * half:].view(k, tail // 2)
        dst = q[nfull * block_n:].view(tail // 2, 2, k)
        torch.bitwise_and(b, 15, out=dst[:, 0].t())
        torch.bitwise_right_shift(b, 4, out=dst[:, 1].t())
    return q


@lru_cache(maxsize=1)
def torch_layout() -> tuple[int, bool] | None:
    """(block_n, halves) of what _convert_weight_to_int4pack_for_cpu writes on this machine ((64, True)
    on an AVX-512 CPU, (32, True) on an AVX2 one), found by packing a probe; None if unrecognised."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))  # [N, K]
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    return next(((b, h) for b, h in ((64, True), (32, True), (32, False))
                 if torch.equal(unpack_int4(packed, 128, 64, b, h), q.to(torch.uint8))), None)


def pack_int4(q: torch.Tensor, block_n: int, halves: bool) -> torch.Tensor:
    """q uint8 [n, k] (0..15, n % 16 == 0) -> packed uint8 [n, k/2] in the layout ``unpack_int4`` reads:
    what _convert_weight_to_int4pack_for_cpu writes on a machine whose packing is (block_n, halves).
    For tests and for reading weights packed on another kind of machine."""
    n, k = q.shape
    nfull, half = n // block_n, block_n // 2
    parts = []
    if nfull:
        b = q[: nfull * block_n].view(nfull, 2, half, k) if halves else \
            q[: nfull * block_n].view(nfull, half, 2, k).transpose(1, 2)  # [nfull, 2, half, k]
        parts.append((b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).reshape(-1))  # [nfull, k, half]
    if n - nfull * block_n:
        t = q[nfull * block_n:].view(-1, 2, k)  # [tail/2, 2, k]: pairs
        parts.append((t[:, 0] | (t[:, 1] << 4)).t().reshape(-1))  # [k, tail/2]
    return torch.cat(parts).view(n, k // 2)
