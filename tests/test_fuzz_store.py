"""Fuzzing the expert store's manifest (store/manifest.py, store/expert_store.py).

A tiny qwen3_moe converted to an int4 store; its manifest.json mutated field by field (any value
of the JSON tree replaced by other JSON or edge numbers, or deleted; several at once) and its
experts file cut or flipped. Every mutant either opens, and then every expert reads (checksums
checked) and runs, or ends in CheckpointError naming the store's file; never another exception.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import Qwen3MoeConfig

from fuzz_support import Tally, fuzz_settings, guarded
from moemesh.loading.convert import convert
from moemesh.store.expert_store import ExpertStore
from tiny import make_checkpoint

NUMBERS = st.sampled_from([0, 1, -1, 2, 63, 64, 4095, 4096, 8192, 2**31, 2**32, 2**63, 2**64, 10**30]) | st.integers()
JUNK = st.recursive(st.none() | st.booleans() | st.floats() | NUMBERS | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def seed_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-store")
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    make_checkpoint(cfg, root / "hf")
    return convert(root / "hf", root / "store", "int4", progress=False)


def json_paths(x: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(x, dict):
        for k, v in x.items():
            if k != "config":  # the HF config is the model's business, not the store's
                out += json_paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x[:3]):
            out += json_paths(v, prefix + (i,))
    return out


def edit(doc: object, path: tuple, value: object, delete: bool) -> object:
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    return doc


def open_and_run(root: Path) -> None:
    store = ExpertStore(root)
    width = store.linear_meta["gate_up"]["in_features"]
    for layer in store.moe_layers:
        for e in range(store.num_experts):
            expert = store.read_expert(layer, e)
            expert(torch.zeros(1, width))


def fuzz(seed_store: Path, examples: int | None = None) -> Tally:
    manifest = json.loads((seed_store / "manifest.json").read_text())
    paths = json_paths(manifest)
    blob = (seed_store / "experts.bin").read_bytes()
    tally = Tally("expert store")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "store"
        shutil.copytree(seed_store, root)
        open_and_run(root)

        @fuzz_settings(examples)
        @given(edits=st.lists(st.tuples(st.sampled_from(paths), JUNK | NUMBERS, st.booleans()), max_size=3),
               cut=st.none() | st.integers(0, len(blob)), flip=st.none() | st.tuples(st.integers(0, len(blob) - 1),
                                                                                       st.integers(1, 255)))
        def case(edits: list, cut: int | None, flip: tuple | None) -> None:
            doc: object = json.loads(json.dumps(manifest))
            for path, value, delete in edits:
                try:
                    doc = edit(doc, path, value, delete)
                except (KeyError, IndexError, TypeError):
                    pass  # an earlier edit removed the path
            (root / "manifest.json").write_text(json.dumps(doc))
            data = bytearray(blob[:cut] if cut is not None else blob)
            if flip is not None and flip[0] < len(data):
                data[flip[0]] ^= flip[1]
            (root / "experts.bin").write_bytes(bytes(data))
            guarded(tally, str(root), lambda: open_and_run(root))

        case()
    tally.report()
    return tally


def test_store_manifest_fuzz(seed_store):
    tally = fuzz(seed_store)
    assert tally.outcomes["CheckpointError"] > 0 and tally.outcomes["ok"] > 0


@pytest.mark.slow
def test_store_manifest_fuzz_long(seed_store):
    fuzz(seed_store, 3000)
