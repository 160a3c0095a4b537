"""Blob checksums of the expert store.

Every blob read from disk is checked before use. zlib's crc32 runs at ~1.5-3 GB/s on this
project's machine: at a quarter-size cache the lazy benchmark reads ~200 MB per token, so crc32
alone took 60-140 ms of CPU per token on a 2-core machine, time taken from the compute threads.
xxh3-64 (the xxhash package) checks the same bytes at memory speed. Stores written before the
``checksum`` manifest field existed use crc32 and still open.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable

import xxhash

DEFAULT = "xxh3_64"
CHECKSUMS: dict[str, Callable[[bytes | memoryview], int]] = {
    "crc32": zlib.crc32,
    "xxh3_64": xxhash.xxh3_64_intdigest,
}


def checksum_fn(name: str) -> Callable[[bytes | memoryview], int]:
    if name not in CHECKSUMS:
        raise ValueError(f"unknown blob checksum {name!r} (known: {sorted(CHECKSUMS)})")
    return CHECKSUMS[name]
