"""Fixed-size slots for the prefix cache's blocks (kvcache/prefix_cache.py), cut from large slabs.

Why: a block is a few KiB that lives for minutes, exported between the engine's short-lived step
buffers (logits, sampler temporaries, hundreds of KiB). Given one by one by malloc, each block
lands in a hole a freed step buffer left and splits it, so the next step buffer of that size
comes from fresh heap: in the soak (bench/soak.py, issue 20) RSS grew ~8x faster than the
cache's own bytes, while malloc's in-use bytes stayed flat. Slabs are few, large, long-lived
allocations, so the step buffers' holes stay whole and are reused.

Slots freed by an eviction are reused only after ``settle()`` (the cache calls it at the start of
each lookup and insert), so the tensors a lookup returned stay valid until the next call.
Slabs are never given back (but by clear()): they hold the most slots ever in use at once, which
for a cache within its capacity is its capacity, plus the blocks of one call (freed slots wait
for the next), rounded up to whole slabs: a 2 MiB cache in the soak kept 3 MiB of slabs.
"""
from __future__ import annotations

import math

import torch

Tensors = dict[str, torch.Tensor]
Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]
SLAB_BYTES = 1 << 20  # a slab: well above the step buffers a block would otherwise split


class BlockPool:
    def __init__(self, spec: Spec, slab_bytes: int = SLAB_BYTES) -> None:
        """spec: name -> (dtype, shape) of one block (KVCache.block_spec)."""
        self.spec = {name: (dtype, tuple(shape)) for name, (dtype, shape) in spec.items()}
        self.block_bytes = sum(torch.empty((), dtype=d).element_size() * math.prod(s) for d, s in self.spec.values())
        self.per_slab = max(1, slab_bytes // max(1, self.block_bytes))
        self.slabs: list[Tensors] = []  # name -> [per_slab, *shape]
        self._free: list[int] = []  # slot = slab index * per_slab + row
        self._released: list[int] = []  # freed since the last settle(): not reused yet

    @property
    def nbytes(self) -> int:
        """Bytes of the slabs (held slots and free ones)."""
        return len(self.slabs) * self.per_slab * self.block_bytes

    def fits(self, data: Tensors) -> bool:
        return data.keys() == self.spec.keys() and all(
            (t.dtype, tuple(t.shape)) == self.spec[name] for name, t in data.items())

    def take(self, data: Tensors) -> int | None:
        """A slot holding a copy of ``data``, or None for a block of another shape (kept as it is)."""
        if not self.fits(data):
            return None
        if not self._free:
            first = len(self.slabs) * self.per_slab
            self.slabs.append({name: torch.empty((self.per_slab, *shape), dtype=dtype)
                               for name, (dtype, shape) in self.spec.items()})
            self._free = list(range(first + self.per_slab - 1, first - 1, -1))  # pop() takes the lowest first
        slot = self._free.pop()
        for name, view in self.views(slot).items():
            view.copy_(data[name])
        return slot

    def views(self, slot: int) -> Tensors:
        """The slot's tensors (views into its slab), made when asked: a held block keeps no tensor
        objects (each costs ~1 KiB of RSS beside the bytes it views)."""
        slab, row = divmod(slot, self.per_slab)
        return {name: t[row] for name, t in self.slabs[slab].items()}

    def give(self, slot: int) -> None:
        """Free ``slot`` (reusable after the next settle())."""
        self._released.append(slot)

    def settle(self) -> None:
        self._free.extend(self._released)
        self._released.clear()

    @property
    def held(self) -> int:
        return len(self.slabs) * self.per_slab - len(self._free) - len(self._released)

    def clear(self) -> None:
        self.slabs, self._free, self._released = [], [], []
