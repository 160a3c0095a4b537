"""Validation of an expert store's manifest.json before anything reads a blob through it.

The manifest says where every expert's bytes are (``layers``), how one blob is cut into tensors
(``parts``) and what each linear is (``linears``): a kernel later trusts those shapes and offsets,
so a corrupt or hostile manifest must fail here, as a CheckpointError naming the file and the field,
rather than as a KeyError, a view past the end of a slot or a kernel reading out of bounds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError

LINEARS = ("gate_up", "down")
ITEMSIZE = {"uint8": 1, "int8": 1, "bfloat16": 2, "float32": 4}
MODES = ("int4", "int8", "bf16", "fp32", "block")
MAX_DIM = 1 << 20  # no expert linear is a million wide: anything past this is corruption


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _need(path: Path, ok: bool, field: str, value: object) -> None:
    if not ok:
        text = repr(value)
        raise CheckpointError(f"{path}: bad manifest field {field}: {text[:80]}")


def check_manifest(path: Path, m: Any, experts_size: int | None) -> None:
    """Types and bounds of every field ExpertStore reads; ``experts_size``: the experts file's bytes
    (None: the file is missing, reported by the caller)."""
    _need(path, isinstance(m, dict), "(top level)", type(m).__name__)
    for key, kind in (("config", dict), ("quant", str), ("hidden_act", str), ("linears", dict), ("parts", list),
                      ("layers", dict), ("experts_file", str), ("trunk_file", str)):
        _need(path, isinstance(m.get(key), kind), key, m.get(key))
    for key in ("experts_file", "trunk_file"):  # plain names inside the store, never a path out of it
        name = m[key]
        _need(path, bool(name) and name == Path(name).name and name not in (".", ".."), key, name)
    _need(path, isinstance(m.get("checksum", ""), str), "checksum", m.get("checksum"))
    blob = m.get("blob_size")
    _need(path, _count(blob) and 0 < blob <= (1 << 34), "blob_size", blob)
    if m.get("expert_module") is not None:
        em = m["expert_module"]
        _need(path, isinstance(em, dict) and all(isinstance(em.get(k), (int, float)) and not isinstance(em.get(k), bool)
                                                 for k in ("alpha", "limit")), "expert_module", em)
    _check_linears(path, m["linears"])
    _check_parts(path, m["parts"], blob, m["linears"])
    _check_layers(path, m["layers"], blob, experts_size, "sum" if "checksum" in m else "crc32")


def _check_linears(path: Path, linears: dict) -> None:
    for name in LINEARS:
        meta = linears.get(name)
        field = f"linears.{name}"
        _need(path, isinstance(meta, dict), field, meta)
        _need(path, isinstance(meta.get("mode"), str) and meta["mode"] in MODES, f"{field}.mode", meta.get("mode"))
        for k in ("in_features", "out_features"):
            _need(path, _count(meta.get(k)) and 0 < meta[k] <= MAX_DIM, f"{field}.{k}", meta.get(k))
        if meta["mode"] in ("int4", "int8"):
            g = meta.get("group_size")
            _need(path, meta["mode"] == "int8" or (_count(g) and 0 < g and meta["in_features"] % g == 0),
                  f"{field}.group_size", g)
            layout = meta.get("int4_layout")
            _need(path, layout is None or (isinstance(layout, list) and len(layout) == 2 and _count(layout[0])),
                  f"{field}.int4_layout", layout)
        if meta["mode"] == "block":
            _need(path, isinstance(meta.get("qtype"), str), f"{field}.qtype", meta.get("qtype"))


def _min_numel(meta: dict, buffer: str) -> int:
    """The fewest elements a kernel reads from this buffer: fewer would send it past the slot."""
    i, o, mode = meta["in_features"], meta["out_features"], meta["mode"]
    if buffer == "bias":
        return o
    if mode == "int4":
        return o * i // 2 if buffer == "qweight" else (i // meta["group_size"]) * o
    if mode == "int8":
        return o * i if buffer == "qweight" else o
    if mode in ("bf16", "fp32"):
        return o * i
    return 1  # block rows: BlockLinear checks its own [N, row_bytes]


def _check_parts(path: Path, parts: list, blob: int, linears: dict) -> None:
    seen: set[tuple[str, str]] = set()
    for i, p in enumerate(parts):
        field = f"parts[{i}]"
        _need(path, isinstance(p, dict), field, p)
        _need(path, isinstance(p.get("linear"), str) and p["linear"] in LINEARS and isinstance(p.get("buffer"), str), field, p)
        _need(path, isinstance(p.get("dtype"), str) and p["dtype"] in ITEMSIZE, f"{field}.dtype", p.get("dtype"))
        shape = p.get("shape")
        _need(path, isinstance(shape, list) and 0 < len(shape) <= 4 and all(_count(s) and s <= MAX_DIM * 16 for s in shape),
              f"{field}.shape", shape)
        off, nbytes = p.get("offset"), p.get("nbytes")
        _need(path, _count(off) and _count(nbytes) and off + nbytes <= blob, f"{field}.offset/nbytes", (off, nbytes))
        numel = 1
        for s in shape:
            numel *= s
        _need(path, numel * ITEMSIZE[p["dtype"]] == nbytes, f"{field}.nbytes", (shape, p["dtype"], nbytes))
        _need(path, off % ITEMSIZE[p["dtype"]] == 0, f"{field}.offset", off)
        _need(path, numel >= _min_numel(linears[p["linear"]], p["buffer"]), f"{field}.shape", shape)
        _need(path, (p["linear"], p["buffer"]) not in seen, field, "duplicate buffer")
        seen.add((p["linear"], p["buffer"]))


def _check_layers(path: Path, layers: dict, blob: int, experts_size: int | None, sum_key: str) -> None:
    _need(path, bool(layers), "layers", layers)
    counts = set()
    for key, blobs in layers.items():
        field = f"layers.{key}"
        _need(path, key.isdigit() and len(key) < 7, field, key)
        _need(path, isinstance(blobs, list) and 0 < len(blobs) <= 1 << 16, field, type(blobs).__name__)
        counts.add(len(blobs))
        for e, b in enumerate(blobs):
            _need(path, isinstance(b, dict) and _count(b.get("offset")) and _count(b.get(sum_key)) and b[sum_key] < 2**64,
                  f"{field}[{e}]", b)
            if experts_size is not None and b["offset"] + blob > experts_size:
                raise CheckpointError(f"{path}: layer {key} expert {e} needs bytes {b['offset']}..{b['offset'] + blob} "
                                      f"but the experts file has {experts_size}: truncated store; reconvert the model")
    _need(path, len(counts) <= 1, "layers", "layers with different expert counts")
