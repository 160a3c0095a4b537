"""The cache of a DeepSeek-sparse-attention model (GLM-5's ``glm_moe_dsa``): the MLA latent cache
plus, per indexer layer, the indexer's own key per token ([Di] each), and the top-k selection a
"shared" layer reuses from the layer before it within one forward pass.

The latent cache must be the dense one: the selection reaches attention as a per-query mask
(``DenseKVCache.attend(allowed=...)``), which TurboQuant's code-domain attention does not take.
Prefix sharing is refused like a hybrid model's (the indexer keys would have to be shared too).
"""
from __future__ import annotations

import torch

from ..batch import BatchLayout
from .base import KVCache
from .dense import DenseKVCache
from .wrapped import WrappedKVCache


class IndexKeys:
    """Per layer per sequence a growable [capacity, Di] buffer of indexer keys."""

    def __init__(self, num_layers: int, dim: int) -> None:
        self.num_layers, self.dim = num_layers, dim
        self.seqs: dict[int, list[torch.Tensor]] = {}

    def add_sequence(self, seq_id: int) -> None:
        self.seqs[seq_id] = [torch.empty(0, self.dim) for _ in range(self.num_layers)]

    def free_sequence(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def write(self, layer: int, seq_id: int, start: int, k: torch.Tensor) -> torch.Tensor:
        """Store k [n, Di] at positions [start, start + n); returns the keys [0, start + n)."""
        bufs, end = self.seqs[seq_id], start + k.shape[0]
        if bufs[layer].shape[0] < end:
            grown = torch.empty(max(end, 2 * bufs[layer].shape[0], 16), self.dim)
            grown[: bufs[layer].shape[0]] = bufs[layer]
            bufs[layer] = grown
        bufs[layer][start:end] = k
        return bufs[layer][:end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bufs in self.seqs.values() for t in bufs)


class IndexedCache(WrappedKVCache):
    shares_prefixes = False

    def __init__(self, kv: KVCache, keys: IndexKeys) -> None:
        if not isinstance(kv, DenseKVCache):
            raise ValueError("sparse attention (glm_moe_dsa) needs the dense KV cache: TurboQuant cannot take its top-k mask")
        super().__init__(kv, keys)
        self.keys = keys
        self.selection: dict[int, torch.Tensor] = {}  # seq -> the last indexer layer's bool [n, end], this pass

    # no layer-major prefill: a "shared" layer reads the selection its predecessor made for the same tokens,
    # which holds within one forward pass but not when a layer runs chunk after chunk before the next one
    supports_starts = False

    def end(self, batch: BatchLayout) -> None:
        self.kv.end(batch)
        self.selection.clear()

    def bytes_per_token(self) -> int:
        """The latent KV and one indexer key per layer (fp32) per token."""
        return self.kv.bytes_per_token() + self.keys.num_layers * self.keys.dim * 4
