"""SerialExperts: one lazy provider shared by every thread of a mesh node, one call at a time.

An elastic node runs its experts from several threads: the engine (an API node's own layers or
experts), the StageServer's worker (layer ranges for other nodes), the ExpertServer's worker
(experts for other nodes). A LazyExperts' cache is not thread-safe, so every call goes through one
lock; the trunk is read-only and needs none. The calls are whole layers, so the lock costs a few
hundred nanoseconds per layer against milliseconds of work.
"""
from __future__ import annotations

import threading

import torch

from ...experts.lazy import LazyExperts
from ...experts.mixing import Group, GroupedProvider


class SerialExperts(GroupedProvider):
    def __init__(self, inner: GroupedProvider) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    @property
    def lazy(self) -> LazyExperts | None:
        return self.inner if isinstance(self.inner, LazyExperts) else None

    @property
    def streams_experts(self) -> bool:
        return bool(getattr(self.inner, "streams_experts", False))

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self.inner.run(layer, x, ids, weights)

    def weighted_outputs(self, layer: int, x: torch.Tensor, groups: list[Group], flat_w: torch.Tensor) -> list[torch.Tensor]:
        with self._lock:
            return self.inner.weighted_outputs(layer, x, groups, flat_w)

    def stats(self) -> dict:
        return self.inner.stats()
