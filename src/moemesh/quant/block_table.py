"""A vocab-sized table kept in its file's block format: the embedding of a GGUF whose token_embd
(or tied output) is Q4_K, Q6_K, Q8_0 ... A token reads one row, so rows are decoded on lookup
(``gguf.quants.dequantize``, the reference every block kernel is tested against) instead of the
whole table being decoded to fp32 at load (gpt-oss: 201088 x 2880 x 4 bytes = 2.3 GB)."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from .blocks import row_bytes


class BlockTable:
    """[V, D] rows of raw blocks (uint8 [V, row_bytes], a view of the file's map); indexing with a
    tensor of ids or a slice gives fp32 rows, like indexing the decoded table would."""

    def __init__(self, qtype: str, raw: torch.Tensor, dim: int) -> None:
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != row_bytes(qtype, dim):
            raise ValueError(f"{qtype} table of width {dim}: raw must be uint8 [V, {row_bytes(qtype, dim)}]")
        self.qtype, self.raw, self.dim = qtype, raw, dim
        self.shape = torch.Size([raw.shape[0], dim])
        self.dtype = torch.float32  # what lookups give

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self.raw[idx]  # [..., row_bytes]
        lead = rows.shape[:-1]
        flat = np.ascontiguousarray(rows.reshape(-1, rows.shape[-1]).numpy())
        out = gguf_quants.dequantize(flat, GGMLQuantizationType[self.qtype])  # [n, D] fp32
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(*lead, self.dim)

    def float(self) -> torch.Tensor:
        """The whole table decoded (fp32 [V, D]): only for a float head that needs every row."""
        return self[:]

    def numel(self) -> int:
        return self.shape[0] * self.dim

    def nbytes(self) -> int:
        return self.raw.numel()
