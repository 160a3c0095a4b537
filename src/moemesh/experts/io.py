"""BlobReader: a pool of threads that pread whole expert blobs into aligned slot buffers.

O_DIRECT where the filesystem allows it (no page-cache copy, nothing left behind in RAM that a
memory cap would count); otherwise buffered reads followed by POSIX_FADV_DONTNEED. ``os.preadv``
releases the GIL, so reads overlap with each other and with torch compute.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


class BlobReader:
    def __init__(self, path: Path, threads: int = 4, direct: bool = True) -> None:
        self.path = path
        self.direct = False
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                self.fd = -1
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moemesh-io")
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds = 0.0  # summed over reads (they overlap: this is not wall time)

    def submit(self, offset: int, buf: memoryview, check: Callable[[memoryview], None] | None = None) -> Future:
        """Read len(buf) bytes at offset into buf (aligned offset, size and address for O_DIRECT),
        then run ``check`` on it in the same worker (a checksum: zlib releases the GIL, so it
        overlaps compute instead of stalling the forward pass)."""
        return self.pool.submit(self._read, offset, buf, check)

    def _read(self, offset: int, buf: memoryview, check: Callable[[memoryview], None] | None = None) -> int:
        t0 = time.perf_counter()
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.direct:  # O_DIRECT refused at read time
                    self._fall_back_to_buffered()
                    continue
                raise
            if n == 0:
                raise EOFError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += n
        if not self.direct:
            os.posix_fadvise(self.fd, offset, len(buf), os.POSIX_FADV_DONTNEED)
        with self.lock:
            self.bytes_read += done
            self.read_seconds += time.perf_counter() - t0
        if check is not None:
            check(buf)
        return done

    def _fall_back_to_buffered(self) -> None:
        with self.lock:
            if self.direct:
                old, self.fd, self.direct = self.fd, os.open(self.path, os.O_RDONLY), False
                os.close(old)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
