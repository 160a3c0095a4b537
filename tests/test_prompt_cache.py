"""--prompt-cache DIR (kvcache/prompt_store.py): prefix blocks survive a restart, are keyed by model
identity, and a corrupt or foreign file is ignored with a warning, never a crash."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moemesh.engine.engine import Engine
from moemesh.engine.prefix import open_prefix_cache
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kvcache.prompt_store import decode_file, encode_file
from moemesh.loading.kv_identity import kv_identity
from moemesh.loading.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=6)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints):
    return tiny_checkpoints["llama-gqa"][1]


def prompt(n: int = 80, seed: int = 0) -> list[int]:
    return torch.randint(3, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_once(model_dir: Path, cache_dir: Path, ids: list[int], kv: str = "dense", block: int = 16):
    """A fresh 'process': new model, KV cache, prefix cache and store -> (sequence, prefix cache)."""
    loaded = load_model(str(model_dir), "int4")
    cache = loaded.model.new_cache(kv)
    pc = open_prefix_cache(cache, 2**28, None, kv_identity(loaded.path, "int4", kv), str(cache_dir),
                           block_size=block)
    engine = Engine(loaded.model, cache=cache, prefix_cache=pc)
    (seq,) = engine.generate([ids], GREEDY)
    pc.store.flush()
    return seq, pc


@pytest.mark.parametrize("kv", ["dense", "turboquant:3.5"])
def test_blocks_survive_a_restart(model_dir, tmp_path, kv):
    ids = prompt()
    first, _ = run_once(model_dir, tmp_path, ids, kv)
    again, pc = run_once(model_dir, tmp_path, ids, kv)
    assert first.cached_tokens == 0 and again.cached_tokens == 64  # 79 restorable tokens: 4 blocks
    assert again.output_ids == first.output_ids
    s = pc.summary()
    assert pc.nbytes == sum(b.nbytes for b in pc.blocks.values())  # a tail read from disk is counted too
    assert s["disk_hit_tokens"] == 64 and s["disk"]["loaded_blocks"] == 4 and s["disk"]["rejected_files"] == 0


def test_another_model_or_format_never_reads_them(model_dir, tiny_checkpoints, tmp_path):
    ids = prompt()
    run_once(model_dir, tmp_path, ids)
    other, _ = run_once(tiny_checkpoints["llama-mha-tied"][1], tmp_path, ids)
    assert other.cached_tokens == 0
    tq, _ = run_once(model_dir, tmp_path, ids, kv="turboquant:3.5")
    assert tq.cached_tokens == 0
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3  # one namespace each


def test_corrupt_files_are_ignored_with_a_warning(model_dir, tmp_path, caplog):
    ids = prompt()
    first, pc = run_once(model_dir, tmp_path, ids)
    files = sorted(Path(pc.store.dir).glob("*/*.blk"))
    assert len(files) == 5  # 80 prompt + 5 new tokens computed: 5 whole blocks
    raw = bytearray(files[0].read_bytes())
    raw[-1] ^= 0xFF  # a flipped bit in the tensor bytes
    files[0].write_bytes(bytes(raw))
    files[1].write_bytes(b"MMPC")  # truncated
    with caplog.at_level(logging.WARNING, logger="moemesh.prompt_cache"):
        again, pc2 = run_once(model_dir, tmp_path, ids)
    assert again.output_ids == first.output_ids
    # at least one of the two is among the 4 restorable blocks: the chain stops at the first bad one
    assert again.cached_tokens < 64
    assert "checksum mismatch" in caplog.text or "too short" in caplog.text
    assert pc2.summary()["disk"]["rejected_files"] >= 1
    # each run removes the bad files it reads and writes those blocks again: two runs more at most
    runs = [run_once(model_dir, tmp_path, ids)[0] for _ in range(2)]
    assert runs[-1].cached_tokens == 64 and all(r.output_ids == first.output_ids for r in runs)


def test_file_format_round_trip_and_checks():
    tensors = {"k": torch.randn(2, 3, 16, 8), "n": torch.randn(2, 3, 16).half(), "c": torch.randint(0, 9, (2, 3, 4, 16), dtype=torch.int32)}
    raw = encode_file({"kind": "block", "key": "ab"}, tensors)
    header, back = decode_file(raw)
    assert header == {"kind": "block", "key": "ab"}
    assert all(torch.equal(tensors[k], back[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    for broken, why in ((raw[:10], "too short"), (b"XXXX" + raw[4:], "not a moemesh"),
                        (raw[:4] + (99).to_bytes(4, "little") + raw[8:], "version 99"),
                        (raw[:-1] + bytes([raw[-1] ^ 1]), "checksum")):
        with pytest.raises(ValueError, match=why):
            decode_file(broken)


def test_generate_cli_prompt_cache_across_processes(model_dir, tmp_path):
    """Two `moemesh generate --prompt-cache DIR` processes: the second restores the first's prefix."""
    ids = ",".join(map(str, prompt(70)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    outs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-m", "moemesh.cli", "generate", str(model_dir), "--prompt-ids", ids,
                              "-n", "4", "--json", "--prompt-cache", str(tmp_path), "--quant", "int4"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(json.loads(res.stdout))
    assert outs[0]["cached_tokens"] == 0 and outs[1]["cached_tokens"] == 64  # blocks of 32
    assert outs[1]["token_ids"] == outs[0]["token_ids"]
    assert outs[1]["kv_bytes_per_token"] == 2 * 2 * 2 * 12 * 4  # layers x (k, v) x kv heads x head dim x fp32
    assert outs[1]["prefix_cache"]["disk_hit_tokens"] == 64
