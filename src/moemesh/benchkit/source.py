"""What ``moemesh plan MODEL`` is looking at: a built-in name, a config.json, an HF checkpoint
directory, an expert store or a GGUF file -> (HF config dict, what the files hold exactly).

Only headers are read (safetensors JSON headers, the GGUF header, the store manifest): planning a
671B checkpoint touches no weight bytes.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, MoemeshError
from .known import KNOWN, lookup
from .stored import Stored

EXPERT_RE = re.compile(r"\.experts\.")  # routed experts in HF names (shared_expert(s) do not match)


def resolve(model: str) -> tuple[str, dict[str, Any], Stored | None]:
    """(display name, HF config dict, stored figures) or MoemeshError with what was expected."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return model, *_store(path)
        if (path / "config.json").is_file():
            return model, _read_json(path / "config.json"), _safetensors(path)
        raise MoemeshError(f"{path}: neither an HF checkpoint (config.json) nor an expert store (manifest.json)")
    if path.is_file():
        if path.suffix == ".gguf":
            from .gguf_config import gguf_config

            return model, *gguf_config(path)
        if path.suffix == ".json":
            return model, _read_json(path), None
        raise MoemeshError(f"{path}: expected a checkpoint directory, a config.json or a .gguf file")
    hit = lookup(model)
    if hit is not None:
        return hit[0], hit[1], None
    raise MoemeshError(f"{model!r} is not a file, a directory or a known model; known models: {', '.join(KNOWN)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CheckpointError(f"{path}: not an HF config (no model_type)")
    return cfg


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise CheckpointError(f"{path}: implausible safetensors header size {n}")
        try:
            return json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None


def _safetensors(root: Path) -> Stored:
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files")
    st = Stored("hf-checkpoint", len(files), 0, 0, 0)
    for f in files:
        for name, info in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            numel = math.prod(int(d) for d in info["shape"])
            st.tensor_bytes += end - begin
            st.params += numel
            st.dtypes[info["dtype"]] = st.dtypes.get(info["dtype"], 0) + end - begin
            if EXPERT_RE.search(name):
                st.expert_bytes += end - begin
                fmt = "MXFP4" if name.endswith("_blocks") else "FP8" if info["dtype"].startswith("F8_") else None
                if fmt and fmt not in st.native:
                    st.native.append(fmt)
    return st


def _store(root: Path) -> tuple[dict[str, Any], Stored]:
    from ..store.expert_store import ExpertStore

    store = ExpertStore(root)
    trunk = _safetensors_file(store.trunk_path)
    # params: the trunk's only (packed blobs do not say how many weights they hold; the config does)
    st = Stored("expert-store", 2, trunk.tensor_bytes + store.expert_bytes(), store.expert_bytes(), trunk.params,
                {**trunk.dtypes, f"experts ({store.quant})": store.expert_bytes()}, store.blob_size, store.quant)
    return dict(store.config), st


def _safetensors_file(path: Path) -> Stored:
    st = Stored("safetensors", 1, 0, 0, 0)
    header = safetensors_header(path)
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            st.tensor_bytes += end - begin
            numel = math.prod(int(d) for d in info["shape"])
            # an int4 trunk (weights/int4_trunk.py): NAME.q4 packs two weights a byte; its scales are not weights
            # (a head table keeps its float tensor beside its int4 copy: count it once)
            if name.endswith(".q4"):
                numel = 0 if name.removesuffix(".q4") in header else 2 * numel
            st.params += 0 if name.endswith((".q4_scale", ".q4_zero")) else numel
            dtype = "int4 (trunk linears)" if name.endswith((".q4", ".q4_scale", ".q4_zero")) else info["dtype"]
            st.dtypes[dtype] = st.dtypes.get(dtype, 0) + end - begin
    return st
