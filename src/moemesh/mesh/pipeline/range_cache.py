"""RangeCache: the cache of layers [start, end) seen through the model's own layer numbers.

Decoder layers keep the numbers they were built with, so one built layer can serve in any range a
plan gives its node; the cache of a range (models.transformer.model_cache over the range's layers)
holds only that range's layers, numbered from 0 per kind. The numbers a layer uses are per kind:
attention layers number their KV entries (``attn.layer``: the global layer for plain stacks, the
index among attention layers for hybrid ones), Gated DeltaNet layers their recurrent states, and
sparse-attention indexers their keys. The view subtracts, per kind, the number of the range's
first layer of that kind (``offsets``), so layer g of a kind reads the range cache's entry
g - offsets[kind].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ...batch import BatchLayout
from ...kvcache.base import KVCache
from ...layers.gated_deltanet import GatedDeltaNet

KINDS = ("attn", "linear", "indexer")


def range_offsets(layers: Sequence[torch.nn.Module]) -> dict[str, int]:
    """Per kind, the cache number of the first layer of that kind among ``layers`` (decoder layers in
    order): what a range cache built over them numbers 0."""
    out: dict[str, int] = {}
    for layer in layers:
        attn = layer.attn
        out.setdefault("linear" if isinstance(attn, GatedDeltaNet) else "attn", attn.layer)
        indexer = getattr(attn, "indexer", None)
        if indexer is not None:
            out.setdefault("indexer", indexer.layer)
    return out


class _Shifted:
    """An object whose ``layer``-first methods (``get``, ``write``) see shifted layer numbers."""

    def __init__(self, inner, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def get(self, layer: int, seq_id: int):
        return self.inner.get(layer - self.offset, seq_id)

    def write(self, layer: int, seq_id: int, start: int, k: torch.Tensor) -> torch.Tensor:
        return self.inner.write(layer - self.offset, seq_id, start, k)


class RangeCache(KVCache):
    def __init__(self, inner: KVCache, offsets: dict[str, int] | int) -> None:
        # an int: every layer one kind, numbered from that start (plain attention stacks)
        self.inner = inner
        self.offsets = {k: offsets for k in KINDS} if isinstance(offsets, int) else dict(offsets)

    @property
    def start(self) -> int:
        return self.offsets.get("attn", 0)

    def add_sequence(self, seq_id: int) -> None:
        self.inner.add_sequence(seq_id)

    def free_sequence(self, seq_id: int) -> None:
        self.inner.free_sequence(seq_id)

    def length(self, seq_id: int) -> int:
        return self.inner.length(seq_id)

    def begin(self, batch: BatchLayout) -> None:
        self.inner.begin(batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BatchLayout, scale: float,
               window: int | None = None, sinks: torch.Tensor | None = None, **kw) -> torch.Tensor:
        local = layer - self.offsets.get("attn", 0)
        if sinks is not None:  # gpt_oss; other caches' attend may not take the keyword
            kw["sinks"] = sinks
        return self.inner.attend(local, q, k, v, batch, scale, window, **kw)  # kw: sparse attention's allowed

    # the pieces a hybrid (HybridCache.states) or sparse-attention (IndexedCache.keys, .selection)
    # layer reads; absent (AttributeError) when the inner cache has none
    @property
    def states(self) -> _Shifted:
        return _Shifted(self.inner.states, self.offsets.get("linear", 0))  # type: ignore[attr-defined]

    @property
    def keys(self) -> _Shifted:
        return _Shifted(self.inner.keys, self.offsets.get("indexer", 0))  # type: ignore[attr-defined]

    @property
    def selection(self) -> dict[int, torch.Tensor]:
        return self.inner.selection  # type: ignore[attr-defined]

    @selection.setter
    def selection(self, value: dict[int, torch.Tensor]) -> None:
        self.inner.selection = value  # type: ignore[attr-defined]

    def end(self, batch: BatchLayout) -> None:
        self.inner.end(batch)

    def nbytes(self) -> int:
        return self.inner.nbytes()
