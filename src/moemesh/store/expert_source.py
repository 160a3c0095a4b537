"""ExpertSource: where the lazy expert cache reads one expert from, and how its bytes become a module.

Two kinds implement it: an expert store (store/expert_store.py: one checksummed, aligned blob per
expert) and the model's own file (store/file_experts.py: an expert's slices of a GGUF's stacked
tensors or of safetensors files, read in place; store/fp8_file_experts.py: an FP8 checkpoint's e4m3
experts, packed with their block scales after the reads). The cache (experts/cache.py) only asks:

- ``slot_bytes``: how big one cache slot is (every expert fits);
- ``spans(layer, expert)``: the aligned reads that fill a slot (O_DIRECT: file offset, slot offset
  and length all multiples of ALIGN);
- ``finish(layer, expert, slot, verify)``: run on the reader thread once the reads landed (checksum,
  or moving pieces into place);
- ``expert_at(slot_index, slot, layer, expert)``: the expert module as views of the slot's bytes;
  with ``fixed_layout`` every expert's tensors sit at the same places, so the cache builds each slot's
  module once (kernels that cached its pointers keep them: the bytes change, not the views).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGN = 4096  # O_DIRECT needs offsets, sizes and buffers aligned to the logical block size


def round_up(n: int, k: int = ALIGN) -> int:
    return -(-n // k) * k


@dataclass(frozen=True)
class Span:
    """One read into a slot: ``nbytes`` at ``offset`` of file ``file`` to ``slot_offset`` (all multiples of
    ALIGN). The first ``need`` bytes must arrive; the rest of the aligned length may lie past the end of
    the file (an expert at the end of a file)."""

    file: int
    offset: int
    slot_offset: int
    nbytes: int
    need: int


class ExpertSource(ABC):
    files: list[Path]  # what ``Span.file`` indexes
    slot_bytes: int  # a multiple of ALIGN
    fixed_layout: bool = False
    moe_layers: list[int]
    num_experts: int

    @abstractmethod
    def spans(self, layer: int, expert: int) -> list[Span]:
        """The reads that bring one expert into a slot."""

    def finish(self, layer: int, expert: int, slot: memoryview, verify: bool) -> None:
        """After the reads (on the reader thread): check or rearrange the slot's bytes."""

    @abstractmethod
    def expert_at(self, slot_index: int, slot: torch.Tensor, layer: int, expert: int) -> torch.nn.Module:
        """The expert whose bytes ``slot`` (uint8 [slot_bytes]) now holds, as views of it."""

    @abstractmethod
    def expert_bytes(self) -> int:
        """Bytes of every expert together, as read (for statistics and planning)."""
