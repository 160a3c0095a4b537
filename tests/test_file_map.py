"""weights/file_map.private_map: a checkpoint larger than RAM + swap opens (no commit charge), its
views are writable, and writing to them never reaches the file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from moemesh.weights.file_map import private_map


def _ram_and_swap() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux only (the commit limit is Linux's)")
def test_a_file_larger_than_ram_and_swap_maps(tmp_path):
    # a sparse file: no disk used. A writable MAP_PRIVATE map of it without MAP_NORESERVE is one commit
    # charge of its whole size, which the default heuristic overcommit refuses (ENOMEM)
    path = tmp_path / "huge.bin"
    size = 2 * _ram_and_swap()
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(size - 4096)
        f.write(b"\x07" * 4096)
    m = private_map(path)
    try:
        assert len(m) == size
        tail = np.frombuffer(m, dtype=np.uint8, count=4096, offset=size - 4096)
        assert tail.flags.writeable and int(tail.sum()) == 7 * 4096
    finally:
        del tail
        m.close()


def test_writes_stay_private(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * 16)
    m = private_map(path)
    view = np.frombuffer(m, dtype=np.uint8)
    view[:16] = 0  # a copy-on-write page of this process only
    assert int(view[1]) == 0
    del view
    m.close()
    assert path.read_bytes()[:16] == bytes(range(16))
    assert os.path.getsize(path) == 4096
