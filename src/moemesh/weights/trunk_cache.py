"""The trunk's converted linears kept on disk between loads (``~/.cache/moemesh/trunks``).

Loading a float checkpoint or store with ``--quant int4`` (or int8 / bf16) quantizes every trunk
linear and the head again in every process: 8 of a 12 s warm load for the DeepSeek-V3-shaped
benchmark model, most of the first token's wait. The first load writes the converted layers'
buffers (qlinear_state's export: exactly what the kernels read) into one directory per (model files,
quant mode, this machine's int4 packing, the converting code); later loads map them back instead of
converting: the same buffers, so the same bits (tests/test_trunk_cache.py compares logits).

The key covers each source file's name, size and modification time, torch's version, the packing
torch writes here and a hash of the quantizing sources, so an edited model or a changed quantizer
never reads stale layers. An unreadable or corrupt cache is ignored with a warning (the load
converts as before). The caches together stay within ``MOEMESH_TRUNK_CACHE_GB`` (16 by default): a
save removes the least recently loaded. ``MOEMESH_TRUNK_CACHE=0`` turns it off, ``MOEMESH_TRUNK_CACHE=DIR`` puts it in DIR
(the test suite's: a temporary one); otherwise it lives under ``MOEMESH_CACHE``.
Writes are atomic (a temporary directory renamed into place), so concurrent loads never see half a
cache; a mesh stage that builds some layers writes a part for those, and a later load adds the rest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..quant import int4_pack, int4_trunk, qlinear, qlinear_rows, qlinear_state
from ..quant.blocks import BlockLinear
from ..quant.qlinear import QuantLinear
from .gguf_reader import split_paths
from .safetensors_io import SafetensorsFile, write_safetensors

FORMAT = 1
ENV = "MOEMESH_TRUNK_CACHE"
MAX_ENV = "MOEMESH_TRUNK_CACHE_GB"  # the caches' total size; least recently loaded ones go first
DEFAULT_MAX_GB = 16.0
CACHED_MODES = ("int4", "int8", "bf16")  # what a load converts into (fp32 is the stored values: nothing to save)
INDEX = "index.json"


def cache_root() -> Path:
    """``MOEMESH_TRUNK_CACHE`` when it names a directory, else ``$MOEMESH_CACHE/trunks`` (~/.cache/moemesh)."""
    env = os.environ.get(ENV, "")
    if env not in ("", "0", "1"):
        return Path(env)
    return Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "trunks"


@cache  # (the sources do not change under a running process)
def _code_hash() -> str:
    """The sources whose output the cache holds: a change to any of them is a new key."""
    h = hashlib.sha256()
    for mod in (qlinear, qlinear_rows, qlinear_state, int4_pack, int4_trunk):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def source_files(path: Path) -> list[Path]:
    """The files a model's weights come from: a GGUF (every shard of a split one), or a directory's
    safetensors and JSON files."""
    if path.is_file():
        return split_paths(path)
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())


class TrunkCache:
    """Converted linears by entry name (``get`` / ``put``); ``save`` writes what this load converted."""

    def __init__(self, directory: Path, label: str) -> None:
        self.dir, self.label = directory, label
        self.entries: dict[str, dict[str, Any]] = {}  # name -> {"meta", "part", "conv"}
        self._files: dict[str, SafetensorsFile] = {}
        self.new: dict[str, tuple[QuantLinear, Any]] = {}
        self._read_index()

    @classmethod
    def for_model(cls, path: Path, quant: str) -> "TrunkCache | None":
        """The cache of ``path`` loaded with ``quant``, or None when off (``MOEMESH_TRUNK_CACHE=0``)."""
        if os.environ.get(ENV, "1") == "0":
            return None
        try:
            files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source_files(path)]
        except (OSError, CheckpointError):
            return None
        ident = {"format": FORMAT, "path": str(path.resolve()), "files": files, "quant": quant,
                 "torch": torch.__version__, "layout": list(int4_pack.torch_layout()), "code": _code_hash()}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        return cls(cache_root() / f"{path.name}-{quant}-{key}", path.name)

    def _read_index(self) -> None:
        index = self.dir / INDEX
        if not index.is_file():
            return
        try:
            data = json.loads(index.read_text())
            if data.get("format") != FORMAT:
                return
            self.entries = dict(data["entries"])
            os.utime(index)  # loaded now: the last to be pruned
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"{index}: unreadable trunk cache ({exc}); converting the trunk again", RuntimeWarning, stacklevel=3)
            self.entries = {}

    def get(self, name: str) -> QuantLinear | None:
        """The cached layer (buffers viewing the cache file) or None; a broken entry is dropped with a warning."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        try:
            if entry["part"] not in self._files:
                self._files[entry["part"]] = SafetensorsFile(self.dir / entry["part"])
            part = self._files[entry["part"]]
            names = [*qlinear_state.buffer_names(entry["meta"]), *(["bias"] if entry["meta"].get("bias") else [])]
            layer = qlinear_state.from_state(entry["meta"], {b: part.get(f"{name}/{b}") for b in names})
        except (CheckpointError, OSError, KeyError, TypeError, RuntimeError) as exc:
            warnings.warn(f"{self.dir}: trunk cache entry {name!r} unreadable ({exc}); converting it again",
                          RuntimeWarning, stacklevel=2)
            del self.entries[name]
            return None
        return None if isinstance(layer, BlockLinear) else layer

    def conversion(self, name: str) -> Any:
        """What the conversion log recorded when ``name`` was converted (None if nothing)."""
        return self.entries.get(name, {}).get("conv")

    def put(self, name: str, layer: QuantLinear, conv: Any = None) -> None:
        if layer.mode in CACHED_MODES:
            self.new[name] = (layer, conv)

    def save(self) -> None:
        """Write this load's new layers as one more part (atomically); failures only warn."""
        if not self.new:
            return
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir.parent))
            try:
                if (self.dir / INDEX).is_file():  # keep the parts already there (another load may have added one)
                    for p in self.dir.iterdir():
                        os.link(p, tmp / p.name)
                    self._read_index()
                part = f"part-{len({e['part'] for e in self.entries.values()})}-{os.getpid()}.safetensors"
                tensors, entries = [], dict(self.entries)
                for name, (layer, conv) in self.new.items():
                    meta, bufs = qlinear_state.export_state(layer)
                    tensors += [(f"{name}/{b}", t) for b, t in bufs.items()]
                    entries[name] = {"meta": meta, "part": part, "conv": conv}
                write_safetensors(tmp / part, tensors)
                (tmp / INDEX).write_text(json.dumps({"format": FORMAT, "model": self.label, "entries": entries}))
                old = self.dir.with_name(self.dir.name + f".old-{os.getpid()}")
                if self.dir.exists():
                    self.dir.rename(old)
                try:
                    tmp.rename(self.dir)
                except OSError:
                    if old.exists() and not self.dir.exists():
                        old.rename(self.dir)  # (another load won the race: keep what was there)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            warnings.warn(f"{self.dir}: could not write the trunk cache ({exc})", RuntimeWarning, stacklevel=2)
            return
        size = dir_bytes(self.dir) / 2**20
        print(f"moemesh: the converted trunk ({len(self.new)} linears) is cached in {self.dir} ({size:.0f} MiB): "
              f"the next load maps it instead of converting", file=sys.stderr)
        self.new.clear()
        limit = int(max_gb() * 2**30)
        if gone := prune(self.dir.parent, self.dir, limit):
            print(f"moemesh: trunk caches over {limit / 2**30:.1f} GiB ({MAX_ENV}): removed the {len(gone)} least "
                  f"recently loaded", file=sys.stderr)


def max_gb() -> float:
    """``MOEMESH_TRUNK_CACHE_GB`` (a number of GiB; a bad value warns and keeps the default)."""
    text = os.environ.get(MAX_ENV, "")
    try:
        return float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        warnings.warn(f"{MAX_ENV}={text!r}: expected a number of GiB; using {DEFAULT_MAX_GB}", RuntimeWarning, stacklevel=3)
        return DEFAULT_MAX_GB


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def prune(root: Path, keep: Path, limit: int) -> list[Path]:
    """Remove the least recently loaded caches under ``root`` (their index's mtime) until the total is
    within ``limit`` bytes; never ``keep``. A load reading a removed one keeps its open files, or converts."""
    stale = time.time() - 3600  # what a load that died mid-save left (never a live save's: those take seconds)
    for d in root.iterdir():
        if d.is_dir() and (d.name.startswith(".tmp-") or ".old-" in d.name) and d.stat().st_mtime < stale:
            shutil.rmtree(d, ignore_errors=True)
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / INDEX).is_file()]
    sizes = {d: dir_bytes(d) for d in dirs}
    total, gone = sum(sizes.values()), []
    for d in sorted(dirs, key=lambda d: (d / INDEX).stat().st_mtime):
        if total <= limit:
            break
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)
            total -= sizes[d]
            gone.append(d)
    return gone
