"""A checkpoint file's private, copy-on-write memory map that reserves nothing.

Tensors are views of the map and must be writable (torch warns on read-only numpy buffers, and a
write through a read-only map is a segfault, not an error), while the file itself never changes:
a private (MAP_PRIVATE) writable map. Such a map is charged in full against the kernel's commit
limit unless it is MAP_NORESERVE, and under the default heuristic overcommit one charge larger than
RAM + swap is refused outright: a 63 GB gpt-oss-120b GGUF on a 24 GB machine failed to open with
ENOMEM. Nothing writes to the weights, so nothing needs the reservation; pages are read from the
file on demand either way.
"""
from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

# Linux's MAP_NORESERVE (the same value on x86-64 and arm64; Python's mmap names it only from 3.13)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def private_map(path: str | os.PathLike[str]) -> mmap.mmap:
    """The whole of ``path`` mapped private and writable, with no commit charge (see the module note).
    Raises OSError like mmap.mmap (an empty file cannot be mapped)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE | MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the map keeps its own reference to the file
