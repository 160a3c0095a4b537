"""Fuzzing the safetensors reader (weights/safetensors_io.py) and a sharded checkpoint's index.

Mutants of a small valid file: its JSON header edited field by field (dtype, shape, data_offsets,
the entry or the whole header replaced by other JSON, offsets overlapping another tensor, huge
or negative numbers, NaN), the 8-byte header length overwritten, bytes flipped, the file cut short.
Every mutant either opens, and then every tensor reads, or ends in CheckpointError naming the file.
"""
from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import Tally, fuzz_settings, guarded
from moemesh.weights.safetensors_io import SafetensorsCheckpoint, SafetensorsFile, write_safetensors

TENSORS = [("a", torch.arange(12, dtype=torch.float32).reshape(3, 4)), ("b", torch.ones(5, dtype=torch.bfloat16)),
           ("c", torch.arange(6, dtype=torch.int64)), ("d", torch.zeros(0, 3, dtype=torch.float16))]
NUMBERS = st.sampled_from([0, 1, -1, 3, 4, 8, 48, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63)]) | st.integers()
JUNK = st.recursive(st.none() | st.booleans() | st.floats() | NUMBERS | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


def seed_file(path: Path) -> tuple[dict, bytes]:
    write_safetensors(path, TENSORS)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@st.composite
def header_edit(draw, header: dict) -> tuple:
    name = draw(st.sampled_from(sorted(header)))
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "overlap", "entry", "drop", "header", "metadata"]))
    if kind == "dtype":
        return (kind, name, draw(st.sampled_from(["F32", "BF16", "I64", "U8", "F8_E4M3", "Q4", "", "f32"]) | JUNK))
    if kind == "shape":
        return (kind, name, draw(st.lists(NUMBERS, max_size=4) | JUNK))
    if kind == "offsets":
        return (kind, name, draw(st.lists(NUMBERS, min_size=2, max_size=2) | st.lists(NUMBERS, max_size=3) | JUNK))
    if kind == "overlap":
        return (kind, name, draw(st.sampled_from(sorted(header))))
    if kind == "entry":
        return (kind, name, draw(JUNK))
    if kind == "drop":
        return (kind, name, draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    return (kind, name, draw(JUNK))


def apply_edit(header: dict, edit: tuple) -> object:
    kind, name, value = edit
    h = json.loads(json.dumps(header))
    if kind in ("dtype", "shape", "offsets", "overlap", "drop") and not isinstance(h.get(name), dict):
        return h  # an earlier edit replaced the entry
    if kind == "overlap" and not isinstance(h.get(value), dict):
        return h
    if kind == "dtype":
        h[name]["dtype"] = value
    elif kind == "shape":
        h[name]["shape"] = value
    elif kind == "offsets":
        h[name]["data_offsets"] = value
    elif kind == "overlap":  # claim another tensor's bytes (same dtype and shape fitting them or not)
        h[name]["data_offsets"] = h[value].get("data_offsets")
    elif kind == "entry":
        h[name] = value
    elif kind == "drop":
        h[name].pop(value, None)
    elif kind == "metadata":
        h["__metadata__"] = value
    else:
        return value
    return h


@st.composite
def mutant(draw, header: dict, body: bytes) -> tuple:
    """(header edits, header-length override or None, byte flips, cut) describing one mutant."""
    edits = draw(st.lists(header_edit(header), max_size=2))
    length = draw(st.none() | NUMBERS.filter(lambda n: 0 <= n < 2**64))
    flips = draw(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=2))
    cut = draw(st.none() | st.integers(0, 400))
    return edits, length, flips, cut


def build(header: dict, body: bytes, m: tuple) -> bytes:
    edits, length, flips, cut = m
    h: object = header
    for e in edits:
        h = apply_edit(h, e) if isinstance(h, dict) else h
    raw = json.dumps(h).encode()
    data = bytearray(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    for at, x in flips:
        if at < len(data):
            data[at] ^= x
    return bytes(data if cut is None else data[:cut])


def read_all(path: Path) -> None:
    f = SafetensorsFile(path)
    for name in f.names():
        t = f.get(name)
        assert t.numel() == 0 or t.flatten()[-1] is not None  # touch the last element


def fuzz(examples: int | None = None) -> Tally:
    tally = Tally("safetensors")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        header, body = seed_file(path)
        read_all(path)

        @fuzz_settings(examples)
        @given(m=mutant(header, body))
        def case(m: tuple) -> None:
            path.write_bytes(build(header, body, m))
            guarded(tally, str(path), lambda: read_all(path))

        case()
    tally.report()
    return tally


def fuzz_index(examples: int | None = None) -> Tally:
    tally = Tally("safetensors index")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        seed_file(root / "model-1.safetensors")
        index = root / "model.safetensors.index.json"

        @fuzz_settings(examples)
        @given(doc=JUNK | st.fixed_dictionaries({"weight_map": JUNK | st.dictionaries(
            st.sampled_from(["a", "b", "x"]), st.sampled_from(["model-1.safetensors", "missing.safetensors", "..",
                                                               "/etc/passwd", ""]) | JUNK, max_size=3)}))
        def case(doc: object) -> None:
            index.write_text(json.dumps(doc))
            guarded(tally, str(root), lambda: SafetensorsCheckpoint(root))

        case()
    tally.report()
    return tally


def test_safetensors_fuzz():
    tally = fuzz()
    assert tally.outcomes["CheckpointError"] > 0 and tally.outcomes["ok"] > 0


def test_safetensors_index_fuzz():
    assert fuzz_index().outcomes["CheckpointError"] > 0


@pytest.mark.slow
def test_safetensors_fuzz_long():
    fuzz(3000)
    fuzz_index(1000)
