"""Media: a prompt's images made ready for the text model (what the engine needs, nothing else).

``embeds`` replace the token embeddings at the prompt indices ``rows`` (the image placeholders);
``positions`` [3, prompt length] are the prompt's M-RoPE positions; every token after the prompt
sits at its index + ``delta`` on all three axes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Media:
    rows: torch.Tensor  # [I] int64, sorted: prompt indices of the image placeholder tokens
    embeds: torch.Tensor  # [I, D] fp32
    positions: torch.Tensor  # [3, L] int64
    delta: int

    def positions_for(self, start: int, n: int) -> torch.Tensor:
        """Positions of the sequence's tokens [start, start + n): [3, n]."""
        idx = torch.arange(start, start + n)
        out = (idx + self.delta).expand(3, -1).clone()
        inside = idx < self.positions.shape[1]
        out[:, inside] = self.positions[:, idx[inside]]
        return out

    def overrides(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets within [start, start + n), their embeddings [k, D]) of the image rows in that span."""
        lo, hi = torch.searchsorted(self.rows, start), torch.searchsorted(self.rows, start + n)
        return self.rows[lo:hi] - start, self.embeds[lo:hi]
