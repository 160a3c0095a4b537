"""Bit-packing of per-coordinate codes into uint8 buffers.

A vector's coordinates are split into groups with their own bit width (fractional rates: b+1
bits on one group, b on the other). A group's b-bit codes are stored as bit planes of 4, 2 or 1
bits (3 = 2 + 1, 5 = 4 + 1, ...) so no code ever straddles a byte: plane codes i sits at byte
i*p // 8, bit (i*p) % 8, which is also bit i*p of the little-endian 32-bit word holding it.
Every plane is padded to whole 32-bit words, so unpacking can view the bytes as int32 and
extract all codes of a word with one broadcast shift (fewer, wider ops than per-byte work), and
the codes come out as int32, ready to index a centroid table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PLANE_BITS = (4, 2, 1)  # plane widths that divide 8 (greedy decomposition of a code width)
WORD_BYTES = 4


def plane_widths(bits: int) -> list[int]:
    """Bit planes for a code width, lowest bits first: 3 -> [2, 1], 5 -> [4, 1], 7 -> [4, 2, 1]."""
    out, left = [], bits
    for p in PLANE_BITS:
        while left >= p:
            out.append(p)
            left -= p
    return out


@dataclass(frozen=True)
class _Plane:
    coord_lo: int  # first coordinate of its group
    count: int  # coordinates in the group
    width: int  # bits of this plane
    shift: int  # position of this plane inside the code
    word_lo: int  # first int32 word of the plane in the packed vector
    words: int


class BitLayout:
    """Where each coordinate's code lives inside one packed vector of ``nbytes`` bytes."""

    def __init__(self, groups: list[tuple[int, int]]) -> None:
        """groups: (number of coordinates, bits) in coordinate order."""
        self.groups = [(n, b) for n, b in groups if n > 0]
        planes, coord, word = [], 0, 0
        for n, bits in self.groups:
            shift = 0
            for p in plane_widths(bits):
                words = -(-n * p // 32)  # ceil
                planes.append(_Plane(coord, n, p, shift, word, words))
                shift += p
                word += words
            coord += n
        self.planes = planes
        self.dim = coord
        self.nbytes = word * WORD_BYTES

    @property
    def bits_per_vector(self) -> int:
        return sum(n * b for n, b in self.groups)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: integer [..., dim] (group-local values) -> packed uint8 [..., nbytes]."""
        lead = codes.shape[:-1]
        codes = codes.to(torch.uint8)
        out = torch.zeros(*lead, self.nbytes, dtype=torch.uint8)
        for pl in self.planes:
            per_byte = 8 // pl.width
            part = (codes[..., pl.coord_lo : pl.coord_lo + pl.count] >> pl.shift) & ((1 << pl.width) - 1)
            pad = pl.words * WORD_BYTES * per_byte - pl.count
            part = torch.nn.functional.pad(part, (0, pad)).view(*lead, pl.words * WORD_BYTES, per_byte)
            shifts = torch.arange(0, 8, pl.width, dtype=torch.uint8)
            packed = (part << shifts).sum(-1, dtype=torch.uint8)  # disjoint bits: sum == or
            lo = pl.word_lo * WORD_BYTES
            out[..., lo : lo + pl.words * WORD_BYTES] = packed
        return out

    def unpack(self, packed: torch.Tensor, offsets: list[int] | None = None) -> torch.Tensor:
        """packed uint8 [..., nbytes] -> int32 codes [..., dim]; group g's codes get offsets[g]
        added (so several groups can index one concatenated centroid table)."""
        lead = packed.shape[:-1]
        if packed.stride(-1) != 1:
            packed = packed.contiguous()
        words = packed.view(torch.int32)  # [..., nbytes / 4]
        parts: list[torch.Tensor] = []
        group_codes: torch.Tensor | None = None
        for i, pl in enumerate(self.planes):
            shifts = torch.arange(0, 32, pl.width, dtype=torch.int32)
            w = words[..., pl.word_lo : pl.word_lo + pl.words]
            c = (w.unsqueeze(-1) >> shifts) & ((1 << pl.width) - 1)  # [..., words, 32 / width]
            c = c.view(*lead, pl.words * shifts.numel())[..., : pl.count]
            group_codes = c if pl.shift == 0 else group_codes | (c << pl.shift)
            last_of_group = i + 1 == len(self.planes) or self.planes[i + 1].shift == 0
            if last_of_group:
                g = len(parts)
                if offsets is not None and offsets[g]:
                    group_codes = group_codes + offsets[g]
                parts.append(group_codes)
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=-1)
