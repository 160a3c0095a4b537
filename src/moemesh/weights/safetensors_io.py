"""A zero-copy safetensors reader: tensors are views of a private mmap of the file.

Written by hand (rather than ``safetensors.safe_open``) so that every tensor is checked against
the file size up front and a truncated or corrupt file fails with the file and tensor named.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from .file_map import private_map

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,  # FP8 checkpoints (DeepSeek-V3/R1's weights)
}


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """One ``*.safetensors`` file: ``names()``, ``get(name)`` -> a tensor viewing the mmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{self.path}: truncated or not a safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._check(name, info, size)
        self._check_overlaps()
        # a private map without a commit charge (weights/file_map.py): tensors are writable views and
        # the file never changes
        self._mmap = private_map(self.path) if size else None

    def _check(self, name: str, info: object, size: int) -> tuple[torch.dtype, list[int], int, int]:
        if not isinstance(info, dict):
            raise CheckpointError(f"{self.path}: tensor {name!r}: header entry is not an object")
        dtype_name = info.get("dtype")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{self.path}: tensor {name!r} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets {begin}..{end} for shape {shape}")
        if self.data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated: tensor {name!r} ends at byte {self.data_start + end} but the file has {size}"
            )
        return dtype, shape, begin, end

    def _check_overlaps(self) -> None:
        spans = sorted((b, e, n) for n, (_, _, b, e) in self.entries.items() if e > b)
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:  # two tensors claiming the same bytes: a corrupt or hostile header
                raise CheckpointError(f"{self.path}: tensors {n0!r} and {n1!r} overlap (bytes {b1}..{e0})")

    def names(self) -> list[str]:
        return list(self.entries)

    def mapping(self) -> mmap.mmap | None:
        """The file's private mapping (None for an empty file): for weights/page_out.py."""
        return self._mmap

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.data_start + begin)
        return t.view(shape)


def _weight_map(index: Path) -> dict[str, str]:
    """An index's tensor -> shard file map; shards are plain names beside the index."""
    try:
        doc = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: corrupt index ({exc})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: no weight_map of tensor names to file names")
    bad = [v for v in wm.values() if not v or v != Path(v).name or v in (".", "..")]
    if bad:
        raise CheckpointError(f"{index}: weight_map names {bad[0]!r}, not a file beside the index")
    return wm


class SafetensorsCheckpoint:
    """All tensors of an HF checkpoint directory (one file, or shards with an index)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors files found")
            weight_map = {}
        self.files = {name: SafetensorsFile(self.dir / name) for name in files}
        self.where: dict[str, SafetensorsFile] = {}
        for fname, f in self.files.items():
            for tname in f.names():
                self.where[tname] = f
        missing = [t for t in weight_map if t not in self.where]
        if missing:
            raise CheckpointError(f"{self.dir}: index lists tensor {missing[0]!r} but its file lacks it")

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            raise CheckpointError(f"{self.dir}: missing tensor {name!r}")
        return f.get(name)

    def names(self) -> list[str]:
        return list(self.where)

    def page_out_view(self, t: torch.Tensor) -> int:
        """Page out ``t``'s file pages if it views one of these files (a weight just copied elsewhere)."""
        from .page_out import page_out_view

        return page_out_view([m for f in self.files.values() if (m := f.mapping()) is not None], t)

    def release_unused(self, model: torch.nn.Module) -> int:
        """Page out every mapped range the built model does not view (weights/page_out.py); bytes advised."""
        from .page_out import kept_ranges, page_out_unused

        maps = [m for f in self.files.values() if (m := f.mapping()) is not None]
        return page_out_unused(maps, kept_ranges(model))


REVERSE_DTYPES = {v: k for k, v in DTYPES.items()}


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], chunk: int = 64 << 20) -> None:
    """Stream tensors into a safetensors file one at a time (each may be an mmap view), so the
    writer never holds more than one tensor's bytes beyond what the caller already has."""
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": REVERSE_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            flat = t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            for start in range(0, flat.numel(), chunk):
                f.write(flat[start : start + chunk].numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
