"""``--prompt-cache DIR``: prefix-cache blocks kept on disk, so a restarted server (or an agent
session that comes back later) restores its prefix instead of prefilling it again.

One file per block (``<key>.blk``) and per saved tail (``<key>.tail``) under DIR/<namespace>/, the
namespace being the model's identity + KV format (see PrefixCache: the block keys chain from it,
so they name model + token prefix). A file is

    b"MMPC" | version u32 | xxh3-64 of everything after it u64 | header length u32 | header JSON | tensors

and the header repeats the key, the parent key and the block's tokens (checked against the
lookup), and each tensor's name, dtype and shape (checked against the KV cache's block_spec).
Anything wrong - short file, bad checksum, other version, other shapes - is logged once and the
file removed; the block is then just a miss. Writes go through a background thread (temp file +
rename, so a reader never sees half a file); the directory is kept under ``max_bytes`` by
removing the least recently used files (reads refresh a file's mtime).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
from pathlib import Path

import torch
import xxhash

from .prefix_cache import Block, Tensors, pack_tokens, tensors_nbytes, unpack_tokens

log = logging.getLogger("moemesh.prompt_cache")

MAGIC = b"MMPC"
VERSION = 1
_HEAD = struct.Struct("<4sIQ")  # magic, version, checksum
_LEN = struct.Struct("<I")
MAX_PENDING = 256 * 2**20  # bytes queued for writing before saves are dropped (a slow disk)
DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.uint8)}


def encode_file(header: dict, tensors: Tensors) -> bytes:
    specs, chunks, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        specs.append([name, str(t.dtype), list(t.shape), offset, len(raw)])
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps({**header, "tensors": specs}, separators=(",", ":")).encode()
    body = _LEN.pack(len(head)) + head + b"".join(chunks)
    return _HEAD.pack(MAGIC, VERSION, xxhash.xxh3_64_intdigest(body)) + body


def decode_file(raw: bytes) -> tuple[dict, Tensors]:
    """Raises ValueError naming what is wrong."""
    if len(raw) < _HEAD.size + _LEN.size:
        raise ValueError("file too short")
    magic, version, checksum = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError("not a moemesh prompt-cache file")
    if version != VERSION:
        raise ValueError(f"format version {version}, this moemesh reads {VERSION}")
    body = memoryview(raw)[_HEAD.size :]
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise ValueError("checksum mismatch")
    (n,) = _LEN.unpack_from(body)
    header = json.loads(bytes(body[_LEN.size : _LEN.size + n]))
    data = body[_LEN.size + n :]
    tensors = {}
    for name, dtype, shape, offset, size in header.pop("tensors"):
        if dtype not in DTYPES or offset + size > len(data):
            raise ValueError(f"tensor {name}: bad dtype or extent")
        t = torch.frombuffer(bytearray(data[offset : offset + size]), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        t = t.view(DTYPES[dtype])
        if t.numel() != (int(torch.tensor(shape).prod()) if shape else 1):
            raise ValueError(f"tensor {name}: {size} bytes do not hold shape {shape}")
        tensors[name] = t.view(shape)
    return header, tensors


def check_spec(tensors: Tensors, spec: dict) -> None:
    got = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    want = {k: (d, tuple(s)) for k, (d, s) in spec.items()}
    if got != want:
        raise ValueError(f"tensors {got} do not match this KV cache's {want}")


class PromptStore:
    def __init__(self, root: str | Path, namespace: bytes, block_spec, tail_spec, identity: dict | None = None,
                 max_bytes: int = 8 * 2**30) -> None:
        """block_spec(size) / tail_spec(length): the KV cache's expected tensors; identity: what
        the namespace hashes, written to DIR/<namespace>/model.json for people to read."""
        self.dir = Path(root) / namespace.hex()[:32]
        self.dir.mkdir(parents=True, exist_ok=True)
        if identity is not None and not (self.dir / "model.json").exists():
            (self.dir / "model.json").write_text(json.dumps(identity, indent=1, default=str))
        self.block_spec, self.tail_spec, self.max_bytes = block_spec, tail_spec, max_bytes
        self.loaded = self.saved = self.rejected = self.dropped = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._bytes = sum(p.stat().st_size for p in self.dir.glob("*/*") if p.suffix in (".blk", ".tail"))
        self._writer = threading.Thread(target=self._write_loop, name="moemesh-prompt-cache", daemon=True)
        self._writer.start()

    def _path(self, key: bytes, suffix: str) -> Path:
        h = key.hex()
        return self.dir / h[:2] / f"{h}{suffix}"

    # -- reads (the engine thread) ---------------------------------------------------------------
    def _read(self, path: Path, check) -> tuple[dict, Tensors] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("prompt cache: cannot read %s: %s", path, exc)
            return None
        try:
            header, tensors = decode_file(raw)
            check(header, tensors)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            self.rejected += 1
            log.warning("prompt cache: ignoring %s (%s); removing it", path, exc)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: the last to be pruned
        except OSError:
            pass
        return header, tensors

    def load(self, key: bytes, parent: bytes, tokens: bytes, end: int) -> Block | None:
        """tokens: pack_tokens of the block's ids."""
        def check(header: dict, tensors: Tensors) -> None:
            if (header.get("kind"), header.get("key"), header.get("parent")) != ("block", key.hex(), parent.hex()):
                raise ValueError("header names another block")
            try:
                stored = pack_tokens(header.get("tokens", ()))
            except (OverflowError, TypeError) as exc:
                raise ValueError(f"tokens are not token ids ({exc})") from None
            if stored != tokens:
                raise ValueError("tokens differ from the prefix looked up")
            check_spec(tensors, self.block_spec(len(tokens) // 8))

        got = self._read(self._path(key, ".blk"), check)
        if got is None:
            return None
        self.loaded += 1
        return Block(key, parent, tokens, end, got[1])

    def load_tail(self, key: bytes, length: int) -> Tensors | None:
        def check(header: dict, tensors: Tensors) -> None:
            if (header.get("kind"), header.get("key"), header.get("length")) != ("tail", key.hex(), length):
                raise ValueError("header names another tail")
            check_spec(tensors, self.tail_spec(length))

        got = self._read(self._path(key, ".tail"), check)
        return None if got is None else got[1]

    # -- writes (queued for the writer thread) ------------------------------------------------------
    def save(self, block: Block) -> None:
        if not self._path(block.key, ".blk").exists():
            header = {"kind": "block", "key": block.key.hex(), "parent": block.parent.hex(), "tokens": unpack_tokens(block.tokens)}
            self._enqueue(self._path(block.key, ".blk"), header, block.data)
        if block.tail is not None:
            self.save_tail(block, block.tail)

    def save_tail(self, block: Block, tail: Tensors | None) -> None:
        path = self._path(block.key, ".tail")
        if tail is None:
            self._queue.put((path, None, None, 0))  # a removal, in order with the writes
            return
        self._enqueue(path, {"kind": "tail", "key": block.key.hex(), "length": block.end}, tail)

    def _enqueue(self, path: Path, header: dict, tensors: Tensors) -> None:
        size = tensors_nbytes(tensors)
        with self._lock:
            if self._pending + size > MAX_PENDING:
                self.dropped += 1
                return
            self._pending += size
        self._queue.put((path, header, tensors, size))

    def _write_loop(self) -> None:
        while True:
            path, header, tensors, size = self._queue.get()
            if path is None:
                return
            if isinstance(path, threading.Event):  # flush(): everything before it is written
                path.set()
                continue
            try:
                if header is None:
                    if path.exists():
                        self._bytes -= path.stat().st_size
                        path.unlink()
                    continue
                raw = encode_file(header, tensors)
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_bytes(raw)
                os.replace(tmp, path)
                self._bytes += len(raw)
                self.saved += 1
                if self._bytes > self.max_bytes:
                    self._prune()
            except OSError as exc:
                log.warning("prompt cache: cannot write %s: %s", path, exc)
            finally:
                with self._lock:
                    self._pending -= size

    def _prune(self) -> None:
        files = sorted((p for p in self.dir.glob("*/*") if p.suffix in (".blk", ".tail")), key=lambda p: p.stat().st_mtime)
        for p in files:
            if self._bytes <= 0.9 * self.max_bytes:
                break
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            self._bytes -= size

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every write queued so far is on disk (tests, shutdown)."""
        done = threading.Event()
        self._queue.put((done, None, None, 0))
        return done.wait(timeout)

    def close(self) -> None:
        self._queue.put((None, None, None, 0))
        self._writer.join(5.0)

    def summary(self) -> dict:
        return {"dir": str(self.dir), "bytes": self._bytes, "loaded_blocks": self.loaded, "saved_files": self.saved,
                "rejected_files": self.rejected, "dropped_saves": self.dropped}

