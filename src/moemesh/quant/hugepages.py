"""Huge-page backed memory for the weights the kernels stream every decode step (int4 buffers, block-format rows).

A decode step reads every resident weight it uses once, so its speed is memory bandwidth, and on
4 KiB pages the page walks cost part of it: the kernels' scale rows are strided by N_pad (one
page per group of 32 inputs), and each 2.5 MiB expert spans 640 pages. Linux gives an anonymous
*private* mapping 2 MiB pages when it is advised MADV_HUGEPAGE (THP mode ``madvise``, the common
default; Python's ``mmap.mmap(-1, n)`` is MAP_SHARED, shmem, which never gets them). Measured here
(/tmp harnesses, alternating rounds, 2 threads): the trunk-shaped int4 matmuls 20.9 -> 23.3 GB/s
(qkv), 20.9 -> 24.5 (o_proj), 23.8 -> 30.2 (head); the whole compiled decode step of the
12-layer Qwen3-shaped model +5% (45.8 -> 48.1 tok/s median of 8 rounds).

Where THP is off or unsupported the arena is plain anonymous memory: same bytes, same results.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable

import torch

from ..sysinfo import trim_heap

HUGE_PAGE = 2 << 20
ALIGN = 4096  # every piece starts on a page (O_DIRECT reads land in it; kernels load 64-byte lines)
QUANTIZED_BUFFERS = ("qweight", "scales", "scales_and_zeros")  # what QuantLinear's kernels stream
# freed bytes between malloc_trim calls while moving: the replaced copies (a GGUF's gate + up rows
# concatenated at build, 10.9 GB for a whole Qwen3-30B-A3B) are freed into malloc's heap, not to the OS,
# so without trimming the load held both copies at once (28 GB: OOM-killed on a 24 GB machine)
TRIM_EVERY = 256 << 20


class HugePageArena:
    """One private anonymous mapping, advised MADV_HUGEPAGE, handed out in page-aligned pieces
    (uint8 tensors that keep the mapping alive). Pages are backed on first touch."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.advised = advise_huge(self._map)
        whole = torch.frombuffer(self._map, dtype=torch.uint8)  # [nbytes + 2 MiB]
        start = -whole.data_ptr() % HUGE_PAGE  # 2 MiB-aligned start: whole huge pages from byte 0
        self._mem = whole[start : start + nbytes]  # [nbytes]
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A fresh page-aligned uint8 [nbytes] piece of the arena."""
        if self.used + nbytes > self.nbytes:
            raise MemoryError(f"huge-page arena: {nbytes} bytes asked, {self.nbytes - self.used} left")
        piece = self._mem[self.used : self.used + nbytes]
        self.used += -(-nbytes // ALIGN) * ALIGN
        return piece

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of contiguous ``t`` in the arena (same dtype, shape and bytes)."""
        piece = self.take(t.numel() * t.element_size())
        out = piece.view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


def advise_huge(m: mmap.mmap) -> bool:
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return False
    try:
        m.madvise(advice)
    except OSError:  # THP compiled out or disabled: plain pages
        return False
    return True


def arena_size(sizes: Iterable[int]) -> int:
    """Bytes an arena needs for pieces of these sizes (each rounded up to a page)."""
    return sum(-(-n // ALIGN) * ALIGN for n in sizes)


def move_quantized(modules: Iterable[torch.nn.Module],
                   release: Callable[[torch.Tensor], object] | None = None) -> HugePageArena | None:
    """Move what the decode kernels stream into one new arena: the quantized buffers
    (``QUANTIZED_BUFFERS``) and the raw rows of block-format linears (quant/blocks.BlockLinear's
    ``raw``: a GGUF's K-quant / MXFP4 rows are views of the file's map, whose 4 KiB pages a decode
    would otherwise fault in from disk the first time each expert is routed), one tensor at a time
    (an old buffer is freed as it is replaced when nothing else holds it; the file pages a moved view
    leaves go through ``release``, called with each old tensor once it is copied: a checkpoint's
    ``page_out_view``). Call before anything caches the data
    pointers (the fused expert kernels, the compiled graph's tables): right after the model is built.
    Returns the arena, or None when there is nothing to move."""
    mods = list({id(m): m for m in modules}.values())  # a module listed twice moves once
    todo = [(m, name) for m in mods for name in QUANTIZED_BUFFERS
            if isinstance(m._buffers.get(name), torch.Tensor) and m._buffers[name].is_contiguous()]
    raws = [m for m in mods if isinstance(getattr(m, "raw", None), torch.Tensor) and m.raw.is_contiguous()]
    sizes = [m._buffers[n].numel() * m._buffers[n].element_size() for m, n in todo] + [m.raw.numel() for m in raws]
    if not sizes:
        return None
    arena = HugePageArena(arena_size(sizes))
    freed = 0

    def copied(old: torch.Tensor) -> None:
        nonlocal freed
        if release is not None:
            release(old)
        freed += old.numel() * old.element_size()
        if freed >= TRIM_EVERY:  # give the replaced copies' heap back as the arena fills (all but ``old``)
            trim_heap()
            freed = 0

    for m, name in todo:
        old = m._buffers[name]
        m._buffers[name] = arena.hold(old)
        copied(old)
    for m in raws:
        old = m.raw
        m.raw = arena.hold(old)  # uint8 [N, row_bytes]
        copied(old)
    return arena  # (the loaders trim the heap once more when the load ends)
