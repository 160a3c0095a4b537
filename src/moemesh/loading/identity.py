"""A model's identity: a hash of its config and its tensor index, the same on every machine that
holds the same weights in the same format, whatever the folder is called.

Mesh nodes only work together on one identity (``--auto`` discovery matches listings by it too).
The tensor index is every tensor's name, dtype and shape as the files store them (safetensors
headers, GGUF tensor infos, or an expert store's trunk header plus its blob layout and quant), so
two copies quantized differently, or two models with one config, do not mix.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from ..errors import CheckpointError


def _safetensors_index(path: Path) -> list:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sorted([name, info["dtype"], info["shape"]] for name, info in header.items() if name != "__metadata__")


def tensor_index(path: Path) -> list:
    """[[name, dtype, shape], ...] of a store, an HF directory or a GGUF file."""
    if path.is_file():
        from ..weights.gguf_reader import open_gguf_file

        reader = open_gguf_file(path).reader
        return sorted([t.name, int(t.tensor_type), [int(s) for s in t.shape]] for t in reader.tensors)
    manifest = path / "manifest.json"
    if manifest.is_file():  # an expert store: trunk tensors + what every expert blob holds
        m = json.loads(manifest.read_text())
        layout = [m.get("quant"), m.get("blob_size"), m.get("parts"), sorted((k, len(v)) for k, v in m["layers"].items())]
        return _safetensors_index(path / m["trunk_file"]) + [["<experts>", "", layout]]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors files to identify the model by")
    return sorted(row for f in files for row in _safetensors_index(f))


def model_identity(path: Path, config: dict, run: str = "") -> str:
    """``model_type/`` + 16 hex digits of sha256(config, tensor index, ``run``: how the weights are
    turned into modules, e.g. the --quant mode, when that changes the numbers)."""
    canonical = json.dumps([config, tensor_index(path), run], sort_keys=True, default=str)
    return f"{config.get('model_type', '?')}/{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def identify(name: str, quant: str = "auto", lazy: bool = False) -> str:
    """The identity of the model a node started with ``name``, ``--quant`` and (``lazy``) ``--ram``
    runs: an HF directory run lazily is converted to an int4 store first, so that is part of it."""
    from .source import open_source, resolve_model_path

    path = resolve_model_path(name)
    manifest = path / "manifest.json"
    if path.is_dir() and manifest.is_file():
        config = json.loads(manifest.read_text())["config"]
    else:
        config = open_source(path)[0]
    run = quant + ("+store" if lazy and path.is_dir() and not manifest.is_file() else "")
    return model_identity(path, config, run)
