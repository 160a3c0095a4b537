"""Open a GGUF checkpoint, architecture-agnostic: metadata, and every tensor by its GGUF name with
its type, shape and exact byte range in its file, as a zero-copy view of a memory map.

A split checkpoint (``NAME-00001-of-00003.gguf`` ...) opens as one: metadata from the first shard,
tensors from all of them. Every tensor's byte range is checked against its file before anything
reads it: a truncated file, a tensor whose bytes run into the next one (its type and shape claim
more bytes than the file gives it), an unknown ggml type or a missing shard is a CheckpointError
naming the file and the tensor. Which HF tensor a GGUF name is, and the config, are the model
families' business (models/gguf.py); this module knows nothing about architectures.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import CheckpointError
from .file_map import private_map

SPLIT_RE = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor's type and byte range before building views into the map.

    It also parses through a plain-ndarray view of the memmap: same memory, no copy, but it
    skips np.memmap's per-slice bookkeeping, which makes the metadata parse ~3x faster.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path, mode="r")  # its read-only map is replaced by the data setter's private one

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mm: np.memmap) -> None:
        # a private copy-on-write map without a commit charge (weights/file_map.py): writable views,
        # the file never changes, and a file larger than RAM + swap still opens
        self._mmap = private_map(self._path) if len(mm) else mm
        self._plain = np.frombuffer(self._mmap, dtype=np.uint8) if len(mm) else mm.view(np.ndarray)

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        # gguf-py slices past the end silently (a short array): then a count or length read from a
        # corrupt header loops over empty reads (an array of 2**63 elements never ends). Every read
        # of the header must lie inside the file.
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self._plain):
            raise CheckpointError(f"{self._path}: header runs past the end of the file (byte {end} of "
                                  f"{len(self._plain)}): truncated or corrupt GGUF")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list]:
        """gguf's parse of one metadata value, with arrays of strings or scalars read in one pass instead
        of one recursive call (and its enum, dtype and view bookkeeping) per element: a tokenizer's
        ~50K tokens, merges and token types were most of a GGUF model's load (SmolLM2: ~60 of 94 s of
        CPU on a loaded machine). Same parts, indices and types as gguf's (tests/test_gguf_reader.py
        compares every field of a real file with gguf's own reader)."""
        if self.byte_order != "I" or raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = int(raw_itype[0]), int(alen[0]), orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(GGUFValueType(itype)) if itype in GGUFValueType._value2member_map_ else None
        if itype == GGUFValueType.STRING:
            data, parts = self._plain, [raw_itype, alen]
            u64, size = np.dtype(np.uint64), len(data)
            if offs + 8 * n > size:  # every string takes >= 8 bytes: a corrupt count must not loop for ever
                self._get(offs, np.uint64, n)  # raises the header-past-the-end CheckpointError
            for _ in range(n):  # [u64 length, bytes] per string, as gguf's _get_str
                if offs + 8 > size:
                    self._get(offs, np.uint64)  # raises, naming the file
                (slen,) = struct.unpack_from("<Q", data, offs)
                if offs + 8 + slen > size:
                    self._get(offs + 8, np.uint8, slen)  # raises, naming the file
                parts.append(data[offs : offs + 8].view(u64))
                parts.append(data[offs + 8 : offs + 8 + slen])
                offs += 8 + slen
            return offs - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), [GGUFValueType.ARRAY, GGUFValueType.STRING]
        if scalar is not None and n:
            values = self._get(offs, scalar, n)  # [n]
            parts = [raw_itype, alen, *values.reshape(n, 1)]  # one 1-element view per value, as gguf's
            return 12 + int(values.nbytes), parts, list(range(2, 2 + n)), [GGUFValueType.ARRAY, GGUFValueType(itype)]
        return super()._get_field_parts(orig_offs, raw_type)  # empty or nested arrays: gguf's own walk

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size = len(self._plain)
        ranges = []
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise CheckpointError(
                    f"{self._path}: tensor {name!r} has unknown ggml type {int(raw_dtype[0])}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if len(dims) and int(dims[0]) % block:
                raise CheckpointError(
                    f"{self._path}: tensor {name!r} has rows of {int(dims[0])}, "
                    f"not a multiple of the {ggml_type.name} block size {block}"
                )
            n_elems = math.prod(int(d) for d in dims)  # Python ints: huge dims must not wrap around
            begin = int(start_offs) + int(offset_tensor[0])  # Python ints: numpy's uint64 sum wraps around
            end = begin + n_elems * type_size // block
            if end > file_size:
                raise CheckpointError(
                    f"{self._path}: tensor {name!r} needs bytes {begin}..{end} but the file has only "
                    f"{file_size} bytes (truncated download?)"
                )
            ranges.append((begin, end, name, ggml_type.name))
        ranges.sort()
        for (b0, e0, n0, t0), (b1, _, n1, _) in zip(ranges, ranges[1:]):
            if e0 > b1:  # the header's type and shape claim more bytes than lie before the next tensor
                raise CheckpointError(
                    f"{self._path}: tensor {n0!r} ({t0}) needs bytes {b0}..{e0} but tensor {n1!r} starts at "
                    f"{b1}: its byte size disagrees with its type and shape (corrupt header?)"
                )
        super()._build_tensors(start_offs, fields)


@dataclass(frozen=True)
class TensorInfo:
    """One GGUF tensor (or one expert of a stacked 3-D one): where its bytes are and what they are.

    ``shape`` is in numpy order (GGUF dims reversed): a weight is [out, in], stacked experts
    [E, out, in]. ``data`` views the memory map: typed elements for float/int types, uint8
    [..., row_bytes] for block formats. ``offset`` is absolute in ``file``.
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    data: Any  # np.ndarray view of the map

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the last dimension) in this type."""
        block, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return self.shape[-1] // block * type_size

    def index(self, i: int) -> TensorInfo:
        """Slice ``i`` of the outermost dimension (one expert of a stacked tensor): still a view."""
        if not 0 <= i < self.shape[0]:
            raise CheckpointError(f"{self.file}: tensor {self.name!r} has no index {i} (shape {list(self.shape)})")
        step = self.nbytes // self.shape[0]
        return TensorInfo(f"{self.name}[{i}]", self.ggml_type, self.shape[1:], self.file, self.offset + i * step,
                          step, self.data[i])


def split_paths(path: Path) -> list[Path]:
    """Every shard of a split GGUF (``-00001-of-0000N``) in order, or [path] for a single file.
    A missing shard is a CheckpointError naming it."""
    m = SPLIT_RE.fullmatch(path.name)
    if m is None:
        return [path]
    n = int(m.group(3))
    paths = [path.with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: missing shard {paths.index(p) + 1} of {n} of the split GGUF {paths[0].name}")
    return paths


def _read(path: Path) -> GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4 or int.from_bytes(magic, "little") != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        return _CheckedReader(path)
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        # a header cut short or garbled makes the reader trip over its own offsets
        raise CheckpointError(f"{path}: unreadable GGUF header (truncated or corrupt file?): {e}") from None


class GGUFFile:
    """A memory-mapped GGUF checkpoint (one file or every shard of a split one)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = split_paths(self.path)
        self.readers = [_read(p) for p in self.files]
        self.reader = self.readers[0]  # the gguf package's reader of the first shard (metadata lives there)
        self.tensors: dict[str, TensorInfo] = {}
        for p, r in zip(self.files, self.readers):
            if len(self.files) > 1 and self._split_no(r) not in (None, self.files.index(p)):
                raise CheckpointError(f"{p}: shard number {self._split_no(r)} does not match its file name")
            for t in r.tensors:
                if t.name in self.tensors:
                    raise CheckpointError(f"{p}: tensor {t.name!r} appears in two shards")
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                self.tensors[t.name] = TensorInfo(t.name, t.tensor_type, shape, p, int(t.data_offset), int(t.n_bytes), t.data)
        want = self.metadata("split.tensors.count")
        if want is not None and int(want) != len(self.tensors):
            raise CheckpointError(f"{self.path}: the split GGUF declares {want} tensors but its shards hold {len(self.tensors)}")

    @staticmethod
    def _split_no(reader: GGUFReader) -> int | None:
        f = reader.fields.get("split.no")
        return None if f is None else int(f.contents())

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self.tensors)}, files={len(self.files)})"

    @property
    def architecture(self) -> str | None:
        return self.metadata("general.architecture")

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (str, number, bool or list), or ``default`` when absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, TypeError) as e:  # UnicodeDecodeError included: a garbled string value
            raise CheckpointError(f"{self.path}: unreadable metadata value {key!r} ({e})") from None

    def metadata_keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: checkpoint lacks tensor {name!r}")
        return self.tensors[name]

    def mappings(self) -> list[mmap.mmap]:
        """The memory maps under every shard's tensors (for paging out what a built model does not use)."""
        out = []
        for r in self.readers:
            base = r.data
            while isinstance(base, (np.ndarray, memoryview)):
                base = base.obj if isinstance(base, memoryview) else base.base
            if isinstance(base, mmap.mmap):
                out.append(base)
        return out


def open_gguf_file(path: str | os.PathLike[str]) -> GGUFFile:
    """Map a GGUF file (every shard of a split one); CheckpointError naming file and tensor on a bad one."""
    return GGUFFile(path)
