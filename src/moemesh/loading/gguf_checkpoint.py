"""A GGUF checkpoint read as its family's HF checkpoint: HF-style config, HF tensor names, lazy
(memory-mapped) dequantization, raw block rows; and its WeightSource adapter.

The file (weights/gguf_reader.py) knows tensors by GGUF name; the family (models/<type>.py, its
GGUFSpec, through models.read_gguf_header) says which HF tensor each one is. A tensor's bytes are
touched only when it is dequantized or its block rows are used.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..models import read_gguf_header
from ..models.gguf import Merge
from ..quant import ggml_blocks
from ..weights.gguf_reader import GGUFFile, TensorInfo, open_gguf_file
from ..weights.source import Int4Groups

FLOAT_TYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


class GGUFTensor:
    """One HF tensor of a GGUF file: one GGUF tensor (or one expert of a stacked one), possibly with
    its rows reordered (llama q/k), or several GGUF tensors merged (deepseek2's kv_b)."""

    def __init__(self, path: Path, name: str, info: TensorInfo, row_perm: np.ndarray | None = None,
                 merge: tuple[list[TensorInfo], Merge, dict] | None = None, shape: tuple[int, ...] | None = None,
                 fix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.name = name  # HF name
        self.info = info  # the (first) GGUF tensor: file, byte range, type
        self.gguf_name: str = info.name
        self._path = path
        self._row_perm = row_perm
        self._merge = merge
        self._fix = fix  # undoes a converter's change of the values (qwen3next's norms + 1); float path only
        self.shape: tuple[int, ...] = shape or info.shape
        self.ggml_type: str = info.type_name
        self.nbytes: int = sum(p.nbytes for p in merge[0]) if merge else info.nbytes

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, gguf={self.gguf_name!r}, shape={list(self.shape)}, type={self.ggml_type})"

    def _rows(self, a: np.ndarray) -> torch.Tensor:
        # rows in HF order; np.take along 0 copies, from_numpy does not
        return torch.from_numpy(a if self._row_perm is None else np.take(a, self._row_perm, axis=0))

    def _decode(self, info: TensorInfo) -> np.ndarray:
        try:
            return ggml_blocks.dequantize(info.data, info.ggml_type, info.shape)
        except NotImplementedError:
            raise CheckpointError(
                f"{self._path}: tensor {info.name!r} uses ggml type {info.type_name}, which we cannot decode"
            ) from None

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of ``shape``, values as in the HF checkpoint (q/k rows un-permuted)."""
        if self._merge is not None:
            parts, merge, config = self._merge
            return merge.fn([torch.from_numpy(self._decode(p)) for p in parts], config)
        t = self._rows(self._decode(self.info))
        return t if self._fix is None else self._fix(t)

    def int4_groups(self) -> Int4Groups | None:
        """(q uint8 [out, in] 0..15, scale f32 [out, in//32], minv f32 [out, in//32]) for Q4_0/Q4_1, else None.

        dequantize() == q * scale + minv, each scale/minv repeated over its group of 32 along ``in``.
        """
        if self._merge is not None or self._fix is not None or not ggml_blocks.is_int4(self.info.ggml_type):
            return None
        q, scale, minv = ggml_blocks.int4_groups(self.info.data, self.info.ggml_type, self.shape)
        return self._rows(q), self._rows(scale), self._rows(minv)

    def block_rows(self) -> tuple[str, torch.Tensor, int] | None:
        """(ggml type name, raw uint8 [out, row_bytes] in HF row order, in_features) for a 2-D tensor
        in a block format (K-quants, Q8_0, MXFP4 ...), else None. A view of the map unless the rows
        are reordered (llama q/k: a copy)."""
        if self._merge is not None or self._fix is not None or self.ggml_type in FLOAT_TYPES or len(self.shape) != 2:
            return None
        raw = np.asarray(self.info.data).reshape(self.shape[0], self.info.row_bytes)
        return self.ggml_type, self._rows(raw), self.shape[1]


class GGUFCheckpoint:
    """A memory-mapped GGUF file with an HF-equivalent ``config`` and HF-named ``tensors``."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file
        self.path = file.path
        self.reader = file.reader  # the gguf package's reader of the first shard (GGUF names and order)
        tr = read_gguf_header(file)
        self.spec = tr.spec
        self.architecture = tr.spec.arch
        self.config: dict = tr.config
        self.tensors: dict[str, GGUFTensor] = {}
        for n, (g, e) in tr.names.items():
            info = file.tensors[g] if e is None else file.tensors[g].index(e)
            try:
                perm = tr.spec.row_permutation(n, tr.shapes[n], self.config)
            except CheckpointError as e:
                raise CheckpointError(f"{self.path}: tensor {g!r}: {e}") from None
            self.tensors[n] = GGUFTensor(self.path, n, info, perm, fix=tr.spec.value_fix(n))
        for n, (gnames, merge) in tr.merged.items():
            parts = [file.tensors[g] for g in gnames]
            self.tensors[n] = GGUFTensor(self.path, n, parts[0], merge=(parts, merge, self.config), shape=tr.shapes[n])

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self.tensors)})"

    def release_unused(self, model: torch.nn.Module) -> int:
        """Page out every mapped range the built model does not view (weights/page_out.py), as
        SafetensorsCheckpoint.release_unused does; bytes advised."""
        from ..weights.page_out import kept_ranges, page_out_unused

        return page_out_unused(self.file.mappings(), kept_ranges(model))

    def page_out_view(self, t: torch.Tensor) -> int:
        """Page out ``t``'s file pages if it views this file (a weight just copied elsewhere); bytes."""
        from ..weights.page_out import page_out_view

        return page_out_view(self.file.mappings(), t)

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (str, number, bool or list), or ``default`` when absent."""
        return self.file.metadata(key, default)

    def metadata_keys(self) -> list[str]:
        return self.file.metadata_keys()

    def names(self) -> list[str]:
        """HF names of every tensor (each expert of a 3-D expert tensor on its own)."""
        return list(self.tensors)

    def tensor(self, name: str) -> GGUFTensor:
        """The tensor with this HF name; CheckpointError naming file and tensor when absent."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: checkpoint lacks tensor {name!r}")
        return self.tensors[name]


def open_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Map a GGUF file (all shards of a split one); CheckpointError (bad file) or UnsupportedArchitecture."""
    return GGUFCheckpoint(open_gguf_file(path))


class GGUFSource:
    """WeightSource over a GGUFCheckpoint: floats dequantized, Q4_0/Q4_1 as int4 groups, other block
    formats as raw rows (``blocks``) for BlockLinear."""

    def __init__(self, ckpt: GGUFCheckpoint) -> None:
        self.ckpt = ckpt

    def has(self, name: str) -> bool:
        return name in self.ckpt.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(name).dequantize()

    def int4_groups(self, name: str) -> Int4Groups | None:
        return self.ckpt.tensor(name).int4_groups()

    def blocks(self, name: str) -> tuple[str, torch.Tensor, int] | None:
        return self.ckpt.tensor(name).block_rows()

    def release_view(self, t: torch.Tensor) -> int:
        """Page out a view of the file the build has just copied (GGUFCheckpoint.page_out_view)."""
        return self.ckpt.page_out_view(t)

    def stored_type(self, name: str) -> str:
        return self.ckpt.tensor(name).ggml_type
