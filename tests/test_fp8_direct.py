"""Lazy experts straight from a DeepSeek-style FP8 checkpoint (e4m3 ``weight`` + ``weight_scale_inv``), no
expert store: each expert's e4m3 rows and block scales are packed in its slot into the FP8_E4M3_B128 rows
the resident build computes, so lazy-from-the-file == lazy-from-a-store == resident, bit for bit (logits
and greedy tokens), from one layer's active experts up; sharded checkpoints too; the slot (what --ram
counts) is the packed size plus a few pages; a missing or mis-shaped expert scale fails at load, naming
the file and tensor."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.batch import BatchLayout
from moemesh.errors import CheckpointError, MoemeshError
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.quant import fp8
from moemesh.store.expert_source import ALIGN
from moemesh.store.fp8_file_experts import Fp8FileExpertSource
from test_fp8_checkpoint import greedy, write_checkpoints

PROMPT = [5, 17, 3, 99, 42, 7, 61, 8, 23, 140, 2, 77]


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory) -> dict[str, Path]:
    """Three layers (two MoE layers: the second's experts are prefetched), one file and three shards."""
    root = tmp_path_factory.mktemp("fp8direct")
    one, _ = write_checkpoints(root / "one", layers=3)
    sharded, _ = write_checkpoints(root / "sharded", layers=3, shards=3)
    return {"one": one, "sharded": sharded}


def forward_all(model, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)


def same_run(lazy, want_logits: torch.Tensor, want_tokens: list[int], want_steps: list[torch.Tensor], what) -> None:
    assert torch.equal(forward_all(lazy.model, PROMPT), want_logits), what
    tokens, steps = greedy(lazy.model)
    assert tokens == want_tokens, what
    assert all(torch.equal(a, b) for a, b in zip(steps, want_steps, strict=True)), what


def test_pack_in_place_gives_pack_bytes():
    """Shapes across 128-row bands and K not a multiple of 128, with the reads as late as the slot allows."""
    torch.manual_seed(1)
    for n, k in [(32, 64), (64, 32), (300, 200), (256, 384), (129, 7)]:
        bits = torch.randint(0, 256, (n, k), dtype=torch.uint8)
        scale = torch.rand(-(-n // 128), -(-k // 128)) + 0.1
        want = fp8.pack(bits, scale).flatten()
        for slack in (0, 5, ALIGN):
            src = want.numel() - n * k + slack  # the tightest placement the forward packing allows, and later
            buf = torch.full((src + n * k + 64,), 0xAB, dtype=torch.uint8)
            buf[src : src + n * k] = bits.flatten()
            fp8.pack_in_place(buf, 0, src, n, k, scale, chunk_bytes=1 << 15)
            assert torch.equal(buf[: want.numel()], want), (n, k, slack)
    with pytest.raises(ValueError, match="overtake"):
        fp8.pack_in_place(torch.zeros(4096, dtype=torch.uint8), 0, 0, 8, 128, torch.ones(1, 1))


def reference(src: Path) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """Logits of the prompt, greedy tokens and each step's logits with every expert resident."""
    resident = load_model(str(src)).model
    return forward_all(resident, PROMPT), *greedy(resident)


def test_every_expert_gets_the_resident_bytes(fp8_dirs):
    """Each expert's BlockLinears over the packed slot hold exactly the resident build's rows."""
    resident = load_model(str(fp8_dirs["sharded"]))
    lazy = load_model(str(fp8_dirs["sharded"]), experts=ExpertOptions(slots=3))
    cache, experts = lazy.provider.cache, resident.model.layers[1].ffn.provider.experts
    for layer in resident.args.moe_layers:
        for e in range(resident.args.num_experts):
            (entry,) = cache.acquire([(layer, e)])
            got, want = cache.expert(entry), experts[layer][e]
            assert got.gate_up.qtype == fp8.QTYPE and got.gate_up.in_features == want.gate_up.in_features
            assert torch.equal(got.gate_up.raw, want.gate_up.raw) and torch.equal(got.down.raw, want.down.raw)
            cache.release([entry])


@pytest.mark.parametrize("kind", ["one", "sharded"])
def test_lazy_from_the_fp8_file_equals_store_and_resident(fp8_dirs, kind, tmp_path, monkeypatch):
    """Lazy from the files == resident from the files; lazy from a store == resident from that store;
    with one file all four agree. (A sharded checkpoint's decode steps differ from the single file's
    by ~1e-7 with every expert resident too: the same fp32 trunk vectors (norms, router) lie at other
    alignments in its files, which the float matmuls' bits follow; the experts' bytes are the same.)"""
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))  # where a conversion would go
    q8 = fp8_dirs[kind]
    want = reference(q8)
    store = convert(q8, tmp_path / "store", "auto", progress=False)
    want_store = reference(store)
    if kind == "one":
        assert all(torch.equal(a, b) for a, b in zip(want_store[2], want[2])) and want_store[1] == want[1]
    args = load_model(str(store), experts=ExpertOptions(slots=2)).args
    assert len(args.moe_layers) == 2
    for slots in (args.top_k, args.top_k + 3, args.num_experts * len(args.moe_layers)):
        direct = load_model(str(q8), experts=ExpertOptions(slots=slots))
        source = direct.provider.cache.source
        assert isinstance(source, Fp8FileExpertSource) and direct.path == q8
        assert len(source.files) == (3 if kind == "sharded" else 1)
        same_run(direct, *want, (kind, slots, "direct"))
        stats = direct.provider.stats()
        assert stats["misses"] > 0 and stats["cache_slots"] == slots and stats["bytes_read"] > 0
        if slots > args.top_k:
            assert stats["prefetch_issued"] > 0  # the next MoE layer's experts, as on the other direct paths
        stored = load_model(str(store), experts=ExpertOptions(slots=slots))
        assert not isinstance(stored.provider.cache.source, Fp8FileExpertSource)
        same_run(stored, *want_store, (kind, slots, "store"))
    assert not (tmp_path / "cache" / "stores").exists()  # nothing converted


def test_the_budget_counts_the_packed_expert(fp8_dirs, tmp_path, monkeypatch):
    """A slot holds an expert's packed rows (132 bytes per 128 e4m3 bytes, each row padded to whole blocks)
    plus a few pages for aligned reads; --ram plans with that size: exactly the trunk, reserves and one
    layer's active experts runs (and gives the resident tokens), a byte less is refused."""
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    q8 = fp8_dirs["one"]
    roomy = load_model(str(q8), experts=ExpertOptions(ram=2**30))
    source, args, plan = roomy.provider.cache.source, roomy.args, roomy.budget
    d, inter = args.hidden_size, args.moe_intermediate_size
    packed = 2 * inter * fp8.row_bytes(d) + d * fp8.row_bytes(inter)  # gate + up rows, down rows
    assert packed > 3 * inter * d  # the e4m3 bytes: packing only adds
    assert packed <= source.slot_bytes <= packed + 8 * ALIGN
    assert roomy.provider.stats()["blob_bytes"] == source.slot_bytes
    assert plan is not None and roomy.provider.cache.num_slots == args.num_experts * len(args.moe_layers)
    least = plan.trunk + plan.kv_reserve + plan.overhead + args.top_k * source.slot_bytes
    with pytest.raises(MoemeshError, match="too small"):
        load_model(str(q8), experts=ExpertOptions(ram=least - 1))
    small = load_model(str(q8), experts=ExpertOptions(ram=least))
    assert small.budget is not None and small.budget.slots == args.top_k == small.provider.cache.num_slots
    assert greedy(small.model)[0] == greedy(load_model(str(q8)).model)[0]
    assert not (tmp_path / "cache" / "stores").exists()


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_a_bad_expert_scale_names_file_and_tensor(fp8_dirs, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad"
    shutil.copytree(fp8_dirs["one"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"
    if fault == "missing":
        del tensors[name]
    else:
        tensors[name] = torch.ones(2, 3)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(str(bad / "model.safetensors")) + ".*" + re.escape(name)):
        load_model(str(bad), experts=ExpertOptions(slots=2))
    assert not (tmp_path / "cache" / "stores").exists()


def test_index_json_names_every_shard(fp8_dirs):
    index = json.loads((fp8_dirs["sharded"] / "model.safetensors.index.json").read_text())
    w = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert index["weight_map"][w] != index["weight_map"][w + "_scale_inv"]  # an expert's pieces span files
