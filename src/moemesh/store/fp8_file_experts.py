"""Fp8FileExpertSource: lazy experts read straight from a DeepSeek-style FP8 safetensors checkpoint.

Each expert linear is two tensors of the file: ``weight`` (e4m3 [N, K]) and ``weight_scale_inv``
(one scale per 128x128 block). The kernels compute quant/fp8.py's FP8_E4M3_B128 rows, each block's
scale right before its 128 bytes, so after the reads the rows are packed in the slot itself.

Slot layout: the packed runs (gate rows then up rows: one gate_up matrix; then down) at fixed
offsets from the slot's start, the same for every expert (so the cache builds each slot's module
once); the reads at the slot's end, each weight over its 4096-aligned covering range (O_DIRECT),
then the scales. Packing runs forward (``fp8.pack_in_place``): the reads are placed late enough
that packed rows never overtake bytes still to be read from, so a slot is the packed size (132/128
of the e4m3 bytes when K is a multiple of 128) plus a few pages, which is what the budget counts.
Nothing is checksummed: the file has no sums.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..quant import fp8
from .expert_source import ALIGN, ExpertSource, Span, round_up
from .file_experts import Build, Piece

RUN_ALIGN = 64  # each packed run starts on a cache line


@dataclass(frozen=True)
class Fp8Piece:
    """One FP8 linear of one expert: its e4m3 ``weight`` bytes [rows, cols] and its ``scale`` bytes
    ([ceil(rows/128), ceil(cols/128)] of ``scale_dtype``, checked by the caller)."""

    weight: Piece
    scale: Piece
    rows: int
    cols: int
    scale_dtype: torch.dtype = torch.float32

    @property
    def packed(self) -> int:
        return self.rows * fp8.row_bytes(self.cols)


class Fp8FileExpertSource(ExpertSource):
    """``pieces[(layer, expert)]``: the expert's runs (gate_up: [gate, up], down: [down]), each a list
    of Fp8Pieces whose packed rows are concatenated; ``build(layer, runs)`` makes the module from each
    run's packed bytes (uint8)."""

    def __init__(self, files: list[Path], pieces: dict[tuple[int, int], list[list[Fp8Piece]]], build: Build) -> None:
        if not pieces:
            raise CheckpointError(f"{files[0] if files else '?'}: no experts to read")
        self.files = list(files)
        self._pieces = pieces
        self._build = build
        shapes = {tuple(tuple((p.rows, p.cols) for p in run) for run in runs) for runs in pieces.values()}
        if len({len(s) for s in shapes}) != 1:
            raise ValueError("every expert needs the same number of runs")
        n_runs = len(next(iter(shapes)))
        run_size = [max(sum(p.packed for p in runs[r]) for runs in pieces.values()) for r in range(n_runs)]
        self._out_at = [sum(round_up(s, RUN_ALIGN) for s in run_size[:r]) for r in range(n_runs)]
        # the reads start at the same aligned offset in every slot: the latest any expert needs
        self._reads_at = round_up(max(self._earliest_reads(runs) for runs in pieces.values()))
        self.slot_bytes = max(self._reads_at + sum(self._covering(p) for p in self._read_order(runs))
                              for runs in pieces.values())
        self.fixed_layout = len(shapes) == 1  # every expert's runs at the same offsets, of the same shapes
        self.moe_layers = sorted({layer for layer, _ in pieces})
        self.num_experts = 1 + max(e for _, e in pieces)
        self._expert_bytes = sum(p.weight.nbytes + p.scale.nbytes for runs in pieces.values() for run in runs for p in run)

    @staticmethod
    def _covering(p: Piece) -> int:
        return round_up(p.offset % ALIGN + p.nbytes)

    @staticmethod
    def _read_order(runs: list[list[Fp8Piece]]) -> list[Piece]:
        """The weights in packing order, then their scales (copied out before any packing)."""
        flat = [p for run in runs for p in run]
        return [p.weight for p in flat] + [p.scale for p in flat]

    def _packed_at(self, runs: list[list[Fp8Piece]]) -> list[int]:
        """Where each weight's packed rows start in the slot, in packing order."""
        out = []
        for r, run in enumerate(runs):
            at = self._out_at[r]
            for p in run:
                out.append(at)
                at += p.packed
        return out

    def _earliest_reads(self, runs: list[list[Fp8Piece]]) -> int:
        """The least offset for the reads such that every weight's packed rows end at or before its
        source's end (fp8.pack_in_place's condition; the next weight's source starts after that)."""
        need, read = 0, 0
        for p, at in zip([p for run in runs for p in run], self._packed_at(runs)):
            data = read + p.weight.offset % ALIGN  # the weight's bytes, relative to the reads' start
            need = max(need, at + p.packed - (data + p.weight.nbytes))
            read += self._covering(p.weight)
        return need

    def spans(self, layer: int, expert: int) -> list[Span]:
        out, at = [], self._reads_at
        for p in self._read_order(self._pieces[layer, expert]):
            m = p.offset % ALIGN
            out.append(Span(p.file, p.offset - m, at, round_up(m + p.nbytes), m + p.nbytes))
            at += round_up(m + p.nbytes)
        return out

    def finish(self, layer: int, expert: int, slot: memoryview, verify: bool) -> None:
        """Pack every weight's rows with its block scales, in place (on the reader thread; torch's
        copies release the GIL)."""
        runs = self._pieces[layer, expert]
        flat = [p for run in runs for p in run]
        buf = torch.frombuffer(slot, dtype=torch.uint8)
        data = [s.slot_offset + s.need - p.nbytes for s, p in zip(self.spans(layer, expert), self._read_order(runs))]
        scales = [buf[d : d + p.scale.nbytes].view(p.scale_dtype).view(-(-p.rows // fp8.BLOCK), -(-p.cols // fp8.BLOCK))
                  .to(torch.float32, copy=True) for d, p in zip(data[len(flat):], flat)]  # before packing covers them
        for p, at, src, scale in zip(flat, self._packed_at(runs), data, scales):
            fp8.pack_in_place(buf, at, src, p.rows, p.cols, scale)

    def run_views(self, slot: torch.Tensor, layer: int, expert: int) -> list[torch.Tensor]:
        """uint8 views of each run's packed rows in a slot that ``finish`` has packed."""
        return [slot[at : at + sum(p.packed for p in run)] for at, run in zip(self._out_at, self._pieces[layer, expert])]

    def expert_at(self, slot_index: int, slot: torch.Tensor, layer: int, expert: int) -> torch.nn.Module:
        return self._build(layer, self.run_views(slot, layer, expert))

    def expert_bytes(self) -> int:
        return self._expert_bytes
