"""BlobReader: a pool of threads that pread an expert's spans (store/expert_source.py) into its slot.

O_DIRECT where the filesystem allows it (no page-cache copy, nothing left behind in RAM that a
memory cap would count); otherwise buffered reads followed by POSIX_FADV_DONTNEED. ``os.preadv``
releases the GIL, so reads overlap with each other and with torch compute. One reader serves
every file of a source (an expert store's experts.bin, or each shard of a model's own files).
"""
from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..store.expert_source import Span


class BlobReader:
    def __init__(self, paths: Path | Sequence[Path], threads: int = 4, direct: bool = True) -> None:
        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        self.path = self.paths[0]
        self.fds = [self._open(p, direct) for p in self.paths]
        self.direct = all(d for _, d in self.fds)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moemesh-io")
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.read_seconds = 0.0  # summed over reads (they overlap: this is not wall time)

    @staticmethod
    def _open(path: Path, direct: bool) -> tuple[int, bool]:
        if direct and hasattr(os, "O_DIRECT"):
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError:
                pass
        return os.open(path, os.O_RDONLY), False

    def submit(self, offset: int, buf: memoryview, check: Callable[[memoryview], None] | None = None) -> Future:
        """Read len(buf) bytes at ``offset`` of the first file into buf (aligned offset, size and address
        for O_DIRECT), then run ``check`` on it in the same worker."""
        return self.submit_spans([Span(0, offset, 0, len(buf), len(buf))], buf, check)

    def submit_spans(self, spans: list[Span], slot: memoryview,
                     finish: Callable[[memoryview], None] | None = None) -> Future:
        """Read every span into ``slot``, then run ``finish`` on it in the same worker (a checksum:
        xxh3 releases the GIL, so it overlaps compute instead of stalling the forward pass)."""
        return self.pool.submit(self._read_spans, spans, slot, finish)

    def _read_spans(self, spans: list[Span], slot: memoryview, finish: Callable[[memoryview], None] | None) -> int:
        t0 = time.perf_counter()
        done = 0
        for s in spans:
            done += self._read(s.file, s.offset, slot[s.slot_offset : s.slot_offset + s.nbytes], s.need)
        with self.lock:
            self.bytes_read += done
            self.read_seconds += time.perf_counter() - t0
        if finish is not None:
            finish(slot)
        return done

    def _read(self, file: int, offset: int, buf: memoryview, need: int) -> int:
        done = 0
        while done < len(buf):
            fd, direct = self.fds[file]
            try:
                n = os.preadv(fd, [buf[done:]], offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and direct:  # O_DIRECT refused at read time
                    self._fall_back_to_buffered(file)
                    continue
                raise
            if n == 0:
                if done >= need:  # the aligned tail past the end of the file
                    break
                raise EOFError(f"{self.paths[file]}: unexpected end of file at byte {offset + done}")
            done += n
        if not self.fds[file][1]:
            os.posix_fadvise(self.fds[file][0], offset, len(buf), os.POSIX_FADV_DONTNEED)
        return done

    def _fall_back_to_buffered(self, file: int) -> None:
        with self.lock:
            fd, direct = self.fds[file]
            if direct:
                self.fds[file] = (os.open(self.paths[file], os.O_RDONLY), False)
                self.direct = False
                os.close(fd)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd, _ in self.fds:
            if fd >= 0:
                os.close(fd)
        self.fds = [(-1, False) for _ in self.fds]
