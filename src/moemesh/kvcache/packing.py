"""Bit-packing of per-coordinate codes into 32-bit words.

A vector's coordinates are split into groups with their own bit width (fractional rates: b+1
bits on one group, b on the other). A group's b-bit codes are stored as bit planes of 4, 2 or 1
bits (3 = 2 + 1, 5 = 4 + 1, ...) so no code straddles a word: in a plane of width p, code i
sits in word i // (32/p) at bit (i % (32/p)) * p. A vector of d coordinates at an average of
r bits takes exactly d*r/32 words when every plane fills whole words (d a multiple of 32);
otherwise each plane is padded to whole words.

The cache stores words coordinate-major, ``[..., words, tokens]``: unpacking then yields codes
as [..., coords, tokens] (the transposed key matrix a score matmul wants), and a native kernel
can stream one word position across many tokens with contiguous SIMD loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PLANE_BITS = (4, 2, 1)  # plane widths that divide 32 (greedy decomposition of a code width)


def plane_widths(bits: int) -> list[int]:
    """Bit planes for a code width, lowest bits first: 3 -> [2, 1], 5 -> [4, 1], 7 -> [4, 2, 1]."""
    out, left = [], bits
    for p in PLANE_BITS:
        while left >= p:
            out.append(p)
            left -= p
    return out


@dataclass(frozen=True)
class Plane:
    group: int
    coord_lo: int  # first coordinate of its group
    count: int  # coordinates in the group
    width: int  # bits of this plane
    shift: int  # position of this plane's bits inside the code
    word_lo: int  # first word of the plane in the packed vector
    words: int

    @property
    def per_word(self) -> int:
        return 32 // self.width


class BitLayout:
    """Where each coordinate's code lives inside one packed vector of ``words`` int32 words."""

    def __init__(self, groups: list[tuple[int, int]]) -> None:
        """groups: (number of coordinates, bits) in coordinate order; empty groups are dropped."""
        self.groups = [(n, b) for n, b in groups if n > 0]
        planes, coord, word = [], 0, 0
        for g, (n, bits) in enumerate(self.groups):
            shift = 0
            for p in plane_widths(bits):
                words = -(-n * p // 32)  # ceil
                planes.append(Plane(g, coord, n, p, shift, word, words))
                shift += p
                word += words
            coord += n
        self.planes = planes
        self.dim = coord
        self.words = word
        self._place = {p: torch.tensor([1 << (i * p) for i in range(32 // p)]) for p in PLANE_BITS}

    @property
    def nbytes(self) -> int:
        return 4 * self.words

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: integer [..., dim] (group-local values) -> int32 words [..., words]."""
        lead = codes.shape[:-1]
        codes = codes.to(torch.int64)  # int64 math: small-tensor uint8 shifts take a slow path
        out = torch.empty(*lead, self.words, dtype=torch.int64)
        for pl in self.planes:
            part = codes[..., pl.coord_lo : pl.coord_lo + pl.count]
            part = (part >> pl.shift if pl.shift else part) & ((1 << pl.width) - 1)
            if pl.count % pl.per_word:
                part = F.pad(part, (0, pl.words * pl.per_word - pl.count))
            place = self._place[pl.width]  # [per_word]: 2^(i*p), code i's bit position in a word
            out[..., pl.word_lo : pl.word_lo + pl.words] = (part.view(*lead, pl.words, pl.per_word) * place).sum(-1)
        out -= (out >> 31) << 32  # [0, 2^32) -> the int32 with the same bits
        return out.to(torch.int32)

    def unpack_t(self, words: torch.Tensor) -> list[torch.Tensor]:
        """words int32 [..., words, N] (coordinate-major) -> per group int32 codes [..., n_g, N]."""
        out: list[torch.Tensor] = []
        for pl in self.planes:
            shifts = torch.arange(0, 32, pl.width, dtype=torch.int32).view(-1, 1)  # [per_word, 1]
            w = words[..., pl.word_lo : pl.word_lo + pl.words, :].unsqueeze(-2)  # [..., words, 1, N]
            c = ((w >> shifts) & ((1 << pl.width) - 1)).flatten(-3, -2)[..., : pl.count, :]  # [..., n_g, N]
            if pl.shift == 0:
                out.append(c)
            else:
                out[-1] = out[-1] | (c << pl.shift)
        return out

    def unpack(self, words: torch.Tensor) -> torch.Tensor:
        """words int32 [..., words] (one vector per row) -> int32 codes [..., dim]."""
        return torch.cat([c.squeeze(-1) for c in self.unpack_t(words.unsqueeze(-1))], dim=-1)
