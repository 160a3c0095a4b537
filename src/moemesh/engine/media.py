"""A step's inputs when some of its sequences carry images (models/media.py): M-RoPE positions on
three axes for every token of the step, and the token embeddings with each image placeholder's
row replaced by its image feature. Text-only sequences in the same step get their one position on
all three axes (ordinary RoPE)."""
from __future__ import annotations

import torch

from ..models.transformer import Transformer
from .sequence import Sequence


def has_media(seqs: list[Sequence]) -> bool:
    return any(s.media is not None for s in seqs)


def media_inputs(model: Transformer, seqs: list[Sequence], chunks: list[list[int]],
                 tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (positions [3, T], embeddings [T, D]) for a step whose sequence i feeds chunks[i]."""
    x = model.embed[tokens].float()  # [T, D] (a copy: embeddings may be an mmap view)
    positions, off = [], 0
    for seq, chunk in zip(seqs, chunks):
        start, n = seq.num_computed, len(chunk)
        if seq.media is None:
            positions.append(torch.arange(start, start + n).expand(3, -1))
        else:
            positions.append(seq.media.positions_for(start, n))
            rows, embeds = seq.media.overrides(start, n)
            x[off + rows] = embeds
        off += n
    return torch.cat(positions, dim=1), x
