"""Disk faults in the lazy expert path (issue 20 item 6): an expert read that fails (EIO, a short read,
bytes that change on disk) is read once more into the same cache slot; if it fails again the request
gets a CheckpointError naming the layer and expert, the cache stays consistent and the next request
works. Faults are injected by wrapping BlobReader._read (experts/io.py); the last test changes the
real experts file under a running ``moemesh serve``."""
from __future__ import annotations

import errno
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from transformers import Qwen3MoeConfig

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import CheckpointError
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.store.expert_store import ExpertStore
from tiny import make_checkpoint

PROMPTS = [list(range(5, 30)), [7, 8, 9, 10]]
SLOTS = 3  # fewer than a layer's 8 experts: every token reads


class FaultyReads:
    """Wraps a BlobReader's ``_read``: ``plan[file offset]`` is a queue of faults for the reads at that
    offset ('eio', 'short', 'flip': the bytes read are not the bytes written), consumed one per read."""

    def __init__(self, reader, plan: dict[int, list[str]]) -> None:
        self.inner, self.plan, self.reader = reader._read, plan, reader
        self.injected = 0
        self.buffers: list[int] = []  # address of every buffer read into
        reader._read = self

    def __call__(self, file: int, offset: int, buf: memoryview, need: int) -> int:
        self.buffers.append(np.frombuffer(buf, np.uint8).ctypes.data)
        queue = self.plan.get(offset)
        kind = queue.pop(0) if queue else None
        self.injected += kind is not None
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error (injected)")
        if kind == "short":
            raise EOFError(f"{self.reader.paths[file]}: unexpected end of file at byte {offset + need // 2} (injected)")
        n = self.inner(file, offset, buf, need)
        if kind == "flip":
            buf[123] ^= 0x5A
        return n


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("disk-faults")
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
    make_checkpoint(cfg, root / "hf")
    return convert(root / "hf", root / "store", "int4", progress=False)


def generate(loaded) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=8) for _ in PROMPTS]
    return [s.output_ids for s in Engine(loaded.model).generate(PROMPTS, params)]


def lazy(store: Path):
    loaded = load_model(str(store), experts=ExpertOptions(slots=SLOTS, prefetch=False))
    return loaded, loaded.provider.cache


@pytest.fixture(scope="module")
def reference(store) -> list[list[int]]:
    return generate(lazy(store)[0])


def in_cache(cache, addresses: list[int]) -> bool:
    base = np.frombuffer(cache._view, np.uint8).ctypes.data
    return all(base <= a < base + cache.nbytes() for a in addresses)


@pytest.mark.parametrize("kind", ["eio", "short", "flip"])
def test_one_failed_read_is_retried(store, reference, kind):
    loaded, cache = lazy(store)
    s = ExpertStore(store)
    faults = FaultyReads(cache.reader, {s.offset(layer, e): [kind] for layer in s.moe_layers for e in range(8)})
    assert generate(loaded) == reference  # every first read of an expert failed, every second one worked
    stats = loaded.provider.stats()
    assert faults.injected > 0 and stats["read_retries"] == faults.injected and stats["read_failures"] == 0
    assert in_cache(cache, faults.buffers)  # retries read into the cache's own slots: no memory beyond --ram
    print(f"disk faults {kind}: injected {faults.injected}, survived by a retry {stats['read_retries']}")


@pytest.mark.parametrize("kind", ["eio", "short", "flip"])
def test_failing_twice_names_layer_and_expert_and_the_next_request_works(store, reference, kind):
    loaded, cache = lazy(store)
    s = ExpertStore(store)
    faults = FaultyReads(cache.reader, {s.offset(1, e): [kind, kind] for e in range(8)})
    with pytest.raises(CheckpointError, match=r"layer 1 expert \d") as err:
        generate(loaded)
    assert "experts.bin" in str(err.value)
    assert cache.stats.read_failures == 1 and in_cache(cache, faults.buffers)
    assert len(cache.entries) + len(cache.free_slots) <= SLOTS  # the failed entry gave its slot back
    faults.plan.clear()  # the disk recovers
    assert generate(loaded) == reference
    print(f"disk faults {kind} twice: injected {faults.injected}, failed cleanly {cache.stats.read_failures}")


def test_expert_file_changed_under_a_running_server(tmp_path):
    """The real file: bytes of every blob change after the server started; the request fails with
    500 naming layer and expert, /health stays ok, and once the file is right again requests work."""
    from moemesh.benchkit.chat_moe import build_chat_moe_store
    from moemesh.server.launcher import ServerProcess

    root = build_chat_moe_store(tmp_path / "served", experts=8)
    experts = root / "experts.bin"
    good = experts.read_bytes()
    s = ExpertStore(root)
    server = ServerProcess(str(root), "--ram", "600M", "--threads", "1", "--no-prefetch").start()

    def ask() -> tuple[int, dict]:
        body = json.dumps({"model": root.name, "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(server.base_url + "/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    try:
        bad = bytearray(good)
        for layer in s.moe_layers:
            for e in range(s.num_experts):
                bad[s.offset(layer, e) + 100] ^= 0xFF
        experts.write_bytes(bytes(bad))  # same size, in place: the server's open file sees it
        status, reply = ask()
        assert status == 500, reply
        assert "checksum mismatch in layer 0 expert" in reply["error"]["message"], reply
        assert server.get_json("/health")["status"] == "ok"
        experts.write_bytes(good)
        status, reply = ask()
        assert status == 200 and reply["usage"]["completion_tokens"] > 0, reply
        metrics = urllib.request.urlopen(server.base_url + "/metrics", timeout=10).read().decode()
        assert "moemesh_expert_read_failures" in metrics
    finally:
        server.stop()
