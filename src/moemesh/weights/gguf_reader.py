"""Open a GGUF checkpoint: HF-style config, HF tensor names, lazy (memory-mapped) dequantization.

The file is mapped, never read whole: a tensor's bytes are touched only when it is dequantized.
Architecture specifics (tensor names, config keys, rotary row order) live in gguf_archs.py;
add an `ArchSpec` to `ARCHS` there to support another architecture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFReader

from moemesh.errors import CheckpointError, UnsupportedArchitecture
from moemesh.quant import ggml_blocks as gguf_quants
from moemesh.weights.gguf_archs import ARCHS, ArchSpec


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor's byte range before building views into the map.

    It also parses through a plain-ndarray view of the memmap: same memory, no copy, but it
    skips np.memmap's per-slice bookkeeping, which makes the metadata parse ~3x faster.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path)

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mm: np.memmap) -> None:
        self._mmap = mm  # keeps the mapping alive for the plain view below
        self._plain = mm.view(np.ndarray)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size = len(self._plain)
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
            n_elems = int(np.prod(dims.astype(np.int64))) if len(dims) else 1
            begin = int(start_offs + offset_tensor[0])
            end = begin + n_elems * type_size // block
            if end > file_size:
                raise CheckpointError(
                    f"{self._path}: tensor {name!r} needs bytes {begin}..{end} but the file has only "
                    f"{file_size} bytes (truncated download?)"
                )
        super()._build_tensors(start_offs, fields)


class GGUFTensor:
    """One tensor of a GGUF file, in HF name and orientation; decoded only on request."""

    def __init__(self, path: Path, name: str, raw: Any, row_perm: np.ndarray | None, index: int | None = None) -> None:
        """``index``: one expert (outermost slice) of a 3-D expert tensor, still a view of the map."""
        self.name = name  # HF name
        self.gguf_name: str = raw.name if index is None else f"{raw.name}[{index}]"
        self._path = path
        self._data = raw.data if index is None else raw.data[index]  # view into the memory map
        self._type: GGMLQuantizationType = raw.tensor_type
        self._row_perm = row_perm
        shape = tuple(int(d) for d in reversed(raw.shape.tolist()))  # HF [out, in] ([E, out, in] for experts)
        self.shape: tuple[int, ...] = shape if index is None else shape[1:]
        self.ggml_type: str = self._type.name
        self.nbytes: int = int(raw.n_bytes) if index is None else int(raw.n_bytes) // shape[0]

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, gguf={self.gguf_name!r}, shape={list(self.shape)}, type={self.ggml_type})"

    def _rows(self, a: np.ndarray) -> torch.Tensor:
        # rows in HF order; np.take along 0 copies, from_numpy does not
        return torch.from_numpy(a if self._row_perm is None else np.take(a, self._row_perm, axis=0))

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of `shape`, values as in the HF checkpoint (q/k rows un-permuted)."""
        try:
            out = gguf_quants.dequantize(self._data, self._type, self.shape)
        except NotImplementedError:
            raise CheckpointError(
                f"{self._path}: tensor {self.gguf_name!r} uses ggml type {self.ggml_type}, which we cannot decode"
            ) from None
        return self._rows(out)

    def int4_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(q uint8 [out, in] 0..15, scale f32 [out, in//32], minv f32 [out, in//32]) for Q4_0/Q4_1, else None.

        dequantize() == q * scale + minv, each scale/minv repeated over its group of 32 along `in`.
        """
        if not gguf_quants.is_int4(self._type):
            return None
        q, scale, minv = gguf_quants.int4_groups(self._data, self._type, self.shape)
        return self._rows(q), self._rows(scale), self._rows(minv)


class GGUFCheckpoint:
    """A memory-mapped GGUF file with an HF-equivalent `config` and HF-named `tensors`."""

    def __init__(self, path: Path, reader: GGUFReader, spec: ArchSpec) -> None:
        self.path = path
        self.architecture = spec.name
        self.reader = reader  # the gguf package's reader (raw tensors in GGUF order and names)
        named: dict[str, tuple[Any, int | None]] = {}  # HF name -> (raw tensor, expert index)
        for raw in reader.tensors:
            hf_name = spec.hf_tensor_name(raw.name)
            if hf_name is None:
                raise CheckpointError(f"{path}: tensor {raw.name!r} is not part of a {spec.name} model")
            if "{e}" in hf_name:  # [E, out, in] experts -> one tensor per expert
                if len(raw.shape) != 3:
                    raise CheckpointError(f"{path}: expert tensor {raw.name!r} is not 3-D (shape {raw.shape.tolist()})")
                for e in range(int(raw.shape[-1])):
                    named[hf_name.format(e=e)] = (raw, e)
            else:
                named[hf_name] = (raw, None)
        shapes = {}
        for n, (r, index) in named.items():
            shape = tuple(int(d) for d in reversed(r.shape.tolist()))
            shapes[n] = shape if index is None else shape[1:]
        try:
            self.config: dict = spec.build_config(self.metadata, shapes)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        self.tensors: dict[str, GGUFTensor] = {
            n: GGUFTensor(path, n, r, spec.row_permutation(n, shapes[n], self.config), index)
            for n, (r, index) in named.items()
        }

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self.tensors)})"

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (str, number, bool or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def metadata_keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    def names(self) -> list[str]:
        """HF names of every tensor (each expert of a 3-D expert tensor on its own)."""
        return list(self.tensors)

    def tensor(self, name: str) -> GGUFTensor:
        """The tensor with this HF name; CheckpointError naming file and tensor when absent."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: checkpoint lacks tensor {name!r}")
        return self.tensors[name]


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


def open_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Map a GGUF file; raises CheckpointError (bad file) or UnsupportedArchitecture."""
    path = Path(path)
    reader = _read(path)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    spec = ARCHS.get(arch)
    if spec is None:
        raise UnsupportedArchitecture(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        )
    return GGUFCheckpoint(path, reader, spec)
