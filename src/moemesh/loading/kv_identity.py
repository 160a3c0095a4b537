"""What a model run's KV depends on, as a dict: the prompt cache's namespace (kvcache/prompt_store.py).

Persisted KV blocks are only valid for the same weights, run-time quantization and KV format, so
the identity lists the model's files (name, size, mtime: a changed file is another model), the
quant and KV specs, and the moemesh and torch versions (their kernels produce the bits).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__

FORMAT = 1  # bump when the engine's KV numerics change in a way the versions above do not show


def kv_identity(path: Path, quant: str, kv: str) -> dict:
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"model": str(path), "files": stats, "quant": quant, "kv": kv, "format": FORMAT,
            "moemesh": __version__, "torch": torch.__version__}
