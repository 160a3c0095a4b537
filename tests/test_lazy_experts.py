"""Lazy experts: bit-identical to resident, integrity checks, atomic conversion, policies."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import CheckpointError, MoemeshError
from moemesh.experts.budget import parse_size, plan_budget
from moemesh.experts.policy import LRU, DecayedFrequency
from moemesh.loading import convert as convert_mod
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model

MOE = ["qwen3_moe-norm", "qwen3_moe-nonorm-dense1", "qwen2_moe", "mixtral", "olmoe-gqa-norm"]
PROMPTS = [list(range(5, 30)), [7, 8, 9], [40, 41, 42, 43, 44, 45]]


@pytest.fixture(scope="module")
def stores(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {name: convert(tiny_checkpoints[name][1], root / name, "int4", progress=False) for name in MOE}


def run(loaded, greedy: bool) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0 if greedy else 0.9, seed=7 + i, max_tokens=12) for i in range(3)]
    return [s.output_ids for s in Engine(loaded.model).generate(PROMPTS, params)]


@pytest.mark.parametrize("name", MOE)
def test_lazy_bit_identical_to_resident(stores, name):
    resident = load_model(str(stores[name]))
    top_k = resident.args.top_k
    ref_greedy, ref_sampled = run(resident, True), run(resident, False)
    # top_k slots hold exactly one layer's active experts for one token
    for slots, prefetch in ((top_k, True), (top_k + 1, False), (1000, True)):
        lazy = load_model(str(stores[name]), experts=ExpertOptions(slots=slots, prefetch=prefetch))
        if slots == top_k:
            assert run(lazy, True) == ref_greedy, (slots, prefetch)
        assert run(lazy, False) == ref_sampled, (slots, prefetch)
        stats = lazy.provider.stats()
        assert stats["misses"] > 0
        if not prefetch:  # every byte read was a demanded miss
            assert stats["bytes_read"] == stats["misses"] * stats["blob_bytes"]


def test_lazy_logits_bit_identical(stores):
    import torch

    from moemesh.batch import BatchLayout

    ids = torch.tensor(PROMPTS[0])
    outs = []
    for opts in (ExpertOptions(), ExpertOptions(slots=2), ExpertOptions(slots=5, policy="lru", direct=False)):
        model = load_model(str(stores["qwen3_moe-norm"]), experts=opts).model
        cache = model.new_cache()
        cache.add_sequence(0)
        outs.append(model(ids, torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_lazy_many_tokens_take_one_int4_call_and_match_resident(stores, monkeypatch):
    """A step of several tokens through lazily cached int4 experts: every expert read, then one
    i4_moe_batch call per layer (experts/mixing.mix_batch), logits equal to resident experts' bit for bit.
    (A layer whose reads are still in flight computes its experts as they land instead, with the same
    bits: the first pass reads them, the measured second pass finds every one cached.)"""
    import torch

    from moemesh.batch import BatchLayout
    from moemesh.experts import lazy as lazy_mod

    calls = []
    real = lazy_mod.mix_batch
    monkeypatch.setattr(lazy_mod, "mix_batch", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    ids = torch.tensor(PROMPTS[0])

    def forward(model) -> torch.Tensor:
        cache = model.new_cache()
        cache.add_sequence(0)
        return model(ids, torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)

    resident = forward(load_model(str(stores["qwen3_moe-norm"])).model)
    lazy = load_model(str(stores["qwen3_moe-norm"]), experts=ExpertOptions(slots=1000)).model
    first = forward(lazy)  # reads every expert the prompt picks (some layers while their reads land)
    calls.clear()
    second = forward(lazy)
    moe_layers = sum(hasattr(layer.ffn, "provider") for layer in lazy.layers)
    assert calls == [len(ids)] * moe_layers  # every layer's experts cached: one call each
    assert torch.equal(resident, first) and torch.equal(resident, second)


def test_store_matches_checkpoint_closely(stores, tiny_checkpoints):
    """fp32 store == the HF checkpoint exactly; the int4 store stays close (greedy prefix)."""
    _, d = tiny_checkpoints["mixtral"]
    fp32_store = convert(d, stores["mixtral"].parent / "mixtral-fp32", "fp32", progress=False)
    assert run(load_model(str(fp32_store), experts=ExpertOptions(slots=3)), True) == run(load_model(str(d), "fp32"), True)


def test_corrupt_blob_names_layer_and_expert(stores, tmp_path):
    import shutil

    st = tmp_path / "st"
    shutil.copytree(stores["mixtral"], st)
    manifest = json.loads((st / "manifest.json").read_text())
    offset = manifest["layers"]["1"][2]["offset"]
    with open(st / "experts.bin", "r+b") as f:
        f.seek(offset + 10)
        byte = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="layer 1 expert 2"):
        load_model(str(st))  # resident: every blob is read and checked
    lazy = load_model(str(st), experts=ExpertOptions(slots=4))
    with pytest.raises(CheckpointError, match="layer 1 expert 2"):
        for i in range(20):  # keep generating until the router picks the corrupt expert
            Engine(lazy.model).generate([[5 + i, 9, 11 + i]], SamplingParams(temperature=1.0, seed=i, max_tokens=8))


def test_truncated_store_refused_at_open(stores, tmp_path):
    import shutil

    st = tmp_path / "st"
    shutil.copytree(stores["olmoe-gqa-norm"], st)
    size = (st / "experts.bin").stat().st_size
    os.truncate(st / "experts.bin", size - 4096)
    with pytest.raises(CheckpointError, match="truncated store"):
        load_model(str(st), experts=ExpertOptions(slots=4))


def test_wrong_version_refused(stores, tmp_path):
    import shutil

    st = tmp_path / "st"
    shutil.copytree(stores["olmoe-gqa-norm"], st)
    m = json.loads((st / "manifest.json").read_text())
    m["version"] = 99
    (st / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(str(st))


def test_interrupted_conversion_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert_mod.pack_blob

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(convert_mod, "pack_blob", failing)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoints["mixtral"][1], out, "int4", progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_convert_refuses_existing_and_dense(tiny_checkpoints, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(MoemeshError, match="already exists"):
        convert(tiny_checkpoints["mixtral"][1], tmp_path / "x")
    with pytest.raises(MoemeshError, match="no MoE layers"):
        convert(tiny_checkpoints["llama-gqa"][1], tmp_path / "y")


def test_crc32_stores_still_open_and_verify(stores, tmp_path):
    """Stores written before the checksum field (crc32 per blob) load, run, and catch corruption."""
    import shutil
    import zlib

    st = tmp_path / "old"
    shutil.copytree(stores["mixtral"], st)
    manifest = json.loads((st / "manifest.json").read_text())
    assert manifest.pop("checksum") == "xxh3_64"
    data = (st / "experts.bin").read_bytes()
    size = manifest["blob_size"]
    for blobs in manifest["layers"].values():
        for b in blobs:
            del b["sum"]
            b["crc32"] = zlib.crc32(data[b["offset"] : b["offset"] + size])
    (st / "manifest.json").write_text(json.dumps(manifest))
    ref = run(load_model(str(stores["mixtral"])), True)
    assert run(load_model(str(st), experts=ExpertOptions(slots=3)), True) == ref
    off = manifest["layers"]["1"][2]["offset"]
    with open(st / "experts.bin", "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xff\x00\xff")
    with pytest.raises(CheckpointError, match="layer 1 expert 2"):
        run(load_model(str(st), experts=ExpertOptions(slots=8)), True)


def test_prefetch_top_limits_predictions_and_keeps_output(stores):
    """prefetch_top=1 predicts (so prefetches) each token's single most likely next expert, a subset
    of the full top-k prediction, and changes nothing in the output."""
    import torch

    ref = run(load_model(str(stores["qwen3_moe-norm"])), True)
    full = load_model(str(stores["qwen3_moe-norm"]), experts=ExpertOptions(slots=4))
    one = load_model(str(stores["qwen3_moe-norm"]), experts=ExpertOptions(slots=4, prefetch_top=1))
    assert run(one, True) == ref
    x = torch.randn(3, full.args.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, D]
    for layer, look in one.provider.lookahead.items():
        top1, all_k = set(look.predict(x)), set(full.provider.lookahead[layer].predict(x))
        assert len(top1) <= 3 and top1 <= all_k and len(all_k) > len(top1)


def test_rank_gate_follows_measured_precision():
    from moemesh.experts.lazy import RankGate

    gate = RankGate(0.7, warmup=4)
    for _ in range(3):
        gate.score(0, True)
        gate.score(1, False)
    assert gate.open(0) and gate.open(1) and gate.open(5)  # still warming up / never seen
    gate.score(0, True)
    gate.score(1, False)
    assert gate.open(0) and not gate.open(1)  # 4/4 used vs 0/4
    for _ in range(20):
        gate.score(1, True)
    assert gate.open(1)  # scored while closed: 20/24 >= 0.7 reopens it
    assert gate.precision()[:2] == [1.0, 20 / 24]
    assert RankGate(0.0, warmup=0).open(1)  # 0 = prefetch every predicted expert


def test_rank_gate_prefetches_less_and_keeps_output(stores):
    """A gate that closes every rank after warm-up issues fewer prefetches than no gate; the output
    is the same, and per-rank precision is reported."""
    ref = run(load_model(str(stores["qwen3_moe-norm"])), True)
    runs = {}
    for th in (0.0, 1.01):
        lm = load_model(str(stores["qwen3_moe-norm"]), experts=ExpertOptions(slots=12, prefetch_threshold=th))
        lm.provider.gate.warmup = 2
        assert run(lm, True) == ref
        runs[th] = lm.provider.stats()
    assert runs[1.01]["prefetch_issued"] < runs[0.0]["prefetch_issued"]
    prec = runs[0.0]["prefetch_rank_precision"]
    assert prec and all(p is None or 0.0 <= p <= 1.0 for p in prec)


def test_policies():
    lru = LRU()
    for k in [(0, 1), (0, 2), (0, 3), (0, 1)]:
        lru.touch(k)
    assert lru.victim([(0, 1), (0, 2), (0, 3)]) == (0, 2)
    lfu = DecayedFrequency(decay=0.9)  # fast decay keeps the test short
    for _ in range(5):
        lfu.touch((0, 1))
    lfu.touch((0, 2))
    lfu.touch((0, 3))
    assert lfu.victim([(0, 1), (0, 2), (0, 3)]) == (0, 2)  # rarely used, least recent among equals


@pytest.mark.parametrize("name", ["lru", "lfu"])
def test_policy_fast_victim_matches_reference(name):
    """victim_where (LRU list / decayed-score heap) picks a victim as good as the reference scan,
    over a random cache workload with pinned keys, prefetch inserts and evictions."""
    import random

    from moemesh.experts.policy import make_policy

    rng = random.Random(0)
    policy = make_policy(name)
    if name == "lfu":
        policy.decay, policy.rate = 0.97, -math.log(0.97)  # fast decay: ranks change quickly
    cached: set = set()
    for step in range(3000):
        key = (rng.randrange(4), int(rng.paretovariate(1.2)) % 40)
        pinned = set(rng.sample(sorted(cached), min(len(cached), 3)))
        if key not in cached and len(cached) >= 24:
            allowed = [k for k in cached if k not in pinned]
            fast = policy.victim_where(lambda k: k in cached and k not in pinned)
            ref = policy.victim(allowed)
            assert fast in allowed
            if name == "lru":
                assert fast == ref
            else:  # same decayed score (up to rounding of log vs pow), then same recency
                assert policy._current(fast) == pytest.approx(policy._current(ref), rel=1e-9)
            cached.discard(fast)
            policy.forget(fast)
        if key not in cached:
            cached.add(key)
            policy.insert(key)
        if rng.random() < 0.8:  # the rest stay prefetched, never used
            policy.touch(key)


def test_budget():
    assert parse_size("8G") == 8 * 2**30 and parse_size("512M") == 2**29 and parse_size("2GiB") == 2**31
    with pytest.raises(MoemeshError):
        parse_size("lots")
    plan = plan_budget(2**30, 100 * 2**20, 64 * 2**20, 2**20, 8)
    assert plan.slots == (2**30 - 100 * 2**20 - 64 * 2**20 - plan.overhead) // 2**20
    with pytest.raises(MoemeshError, match="too small"):
        plan_budget(500 * 2**20, 100 * 2**20, 64 * 2**20, 2**20, 8)


def test_cli_convert_and_generate_with_ram(tiny_checkpoints, tmp_path):
    out = tmp_path / "store"
    r = subprocess.run([sys.executable, "-m", "moemesh.cli", "convert", str(tiny_checkpoints["qwen2_moe"][1]), str(out),
                        "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "moemesh.cli", "generate", str(out), "--prompt-ids", "5,6,7", "-n", "5",
                        "--ram", "1G", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["experts"]
    assert stats["misses"] > 0 and stats["hits"] + stats["misses"] > 0 and stats["budget"]["slots"] > 0
    assert {"bytes_read_per_token", "stall_seconds", "prefetch_accuracy", "read_bandwidth_bytes_s"} <= set(stats)


@pytest.mark.parametrize("flag,value,msg", [("--prefetch-threshold", "1.5", "between 0 and 1"),
                                            ("--prefetch-top", "0", "at least 1"), ("--io-threads", "0", "at least 1")])
def test_bad_expert_options_are_clear_errors(flag, value, msg):
    import argparse

    from moemesh.commands.expert_args import add_expert_args, expert_options
    from moemesh.errors import MoemeshError

    p = argparse.ArgumentParser()
    add_expert_args(p)
    with pytest.raises(MoemeshError, match=msg):
        expert_options(p.parse_args([flag, value]))


def test_hf_dir_streams_its_own_files(tiny_checkpoints, tmp_path, monkeypatch):
    """A lazy run of an HF directory reads each expert from the model's own safetensors (no store is
    converted; it used to be, before experts were streamed from the user's files) and decodes what
    the resident model decodes."""
    monkeypatch.setenv("MOEMESH_CACHE", str(tmp_path / "cache"))
    _, d = tiny_checkpoints["olmoe-gqa-norm"]
    lazy = load_model(str(d), experts=ExpertOptions(slots=6))
    assert lazy.path == d and not (tmp_path / "cache" / "stores").exists()
    assert lazy.provider is not None and lazy.provider.streams_experts
    assert run(lazy, True) == run(load_model(str(d)), True)
