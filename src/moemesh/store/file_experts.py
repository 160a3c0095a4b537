"""FileExpertSource: lazy experts read straight from the model's own files (no expert store).

An expert is a few byte ranges of the files: with a GGUF, its slice of each stacked
``ffn_*_exps`` tensor (and of the stacked biases, gpt-oss); with safetensors, its own tensors.
They come in *runs* that must end up contiguous in the slot (gate then up: one gate_up matrix).

Slot layout: one region per run, at the same offset in every slot. Each piece is read with
O_DIRECT over its 4096-aligned covering range, the first piece of a run at its region's start (so
its bytes land at ``offset % 4096``, which varies per expert), the next pieces right after; once
the reads land (``finish``, on the reader thread) every later piece of a run is moved down to
follow the previous one (memmove of that piece: e.g. the up rows, a third of an expert). The
module is then built over views of the run bytes by ``build(layer, runs)``, which the loader
supplies (it knows the formats: BlockLinear rows, fp32 weights, biases); it is rebuilt per read,
since the run bytes start at a per-expert offset. Nothing is checksummed: the file has no sums.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .expert_source import ALIGN, ExpertSource, Span, round_up

Build = Callable[[int, list[torch.Tensor]], torch.nn.Module]  # (layer, uint8 bytes of each run) -> expert


@dataclass(frozen=True)
class Piece:
    """Bytes of one tensor of one expert: ``nbytes`` at ``offset`` (exact) of file ``file``."""

    file: int
    offset: int
    nbytes: int


class FileExpertSource(ExpertSource):
    """``pieces[(layer, expert)]``: the expert's runs, each a list of pieces (every expert has as
    many runs)."""

    def __init__(self, files: list[Path], pieces: dict[tuple[int, int], list[list[Piece]]], build: Build) -> None:
        if not pieces:
            raise CheckpointError(f"{files[0] if files else '?'}: no experts to read")
        self.files = list(files)
        self._pieces = pieces
        self._build = build
        n_runs = {len(runs) for runs in pieces.values()}
        if len(n_runs) != 1:
            raise ValueError(f"every expert needs the same number of runs, got {sorted(n_runs)}")
        region = [0] * n_runs.pop()
        for runs in pieces.values():
            for r, run in enumerate(runs):
                region[r] = max(region[r], sum(round_up(p.offset % ALIGN + p.nbytes) for p in run))
        self._region_at = [sum(region[:r]) for r in range(len(region))]
        self.slot_bytes = sum(region)
        self.fixed_layout = False
        self.moe_layers = sorted({layer for layer, _ in pieces})
        self.num_experts = 1 + max(e for _, e in pieces)
        self._expert_bytes = sum(p.nbytes for runs in pieces.values() for run in runs for p in run)

    def spans(self, layer: int, expert: int) -> list[Span]:
        out = []
        for r, run in enumerate(self._pieces[layer, expert]):
            at = self._region_at[r]
            for p in run:
                m = p.offset % ALIGN
                length = round_up(m + p.nbytes)
                out.append(Span(p.file, p.offset - m, at, length, m + p.nbytes))
                at += length
        return out

    def finish(self, layer: int, expert: int, slot: memoryview, verify: bool) -> None:
        """Move each run's later pieces down to follow its first (leftward moves, in order: no piece
        overwrites bytes still to be moved)."""
        base = ctypes.addressof(ctypes.c_char.from_buffer(slot))
        for r, run in enumerate(self._pieces[layer, expert]):
            first = run[0]
            m0 = first.offset % ALIGN
            dest = self._region_at[r] + m0 + first.nbytes
            at = self._region_at[r] + round_up(m0 + first.nbytes)
            for p in run[1:]:
                m = p.offset % ALIGN
                if at + m != dest:
                    ctypes.memmove(base + dest, base + at + m, p.nbytes)  # releases the GIL
                dest += p.nbytes
                at += round_up(m + p.nbytes)

    def run_views(self, slot: torch.Tensor, layer: int, expert: int) -> list[torch.Tensor]:
        """uint8 views of each run's contiguous bytes in a slot that ``finish`` has arranged."""
        out = []
        for r, run in enumerate(self._pieces[layer, expert]):
            start = self._region_at[r] + run[0].offset % ALIGN
            out.append(slot[start : start + sum(p.nbytes for p in run)])
        return out

    def expert_at(self, slot_index: int, slot: torch.Tensor, layer: int, expert: int) -> torch.nn.Module:
        return self._build(layer, self.run_views(slot, layer, expert))

    def expert_bytes(self) -> int:
        return self._expert_bytes
