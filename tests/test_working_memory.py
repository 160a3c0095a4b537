"""Working memory under --ram (engine/memory.py): a long prompt's KV cache and activations are paid for
with expert-cache slots whose pages go back to the kernel, taken back when the sequence ends; the output
is unchanged; a prompt whose KV cache cannot fit is refused naming the sizes. And the dense cache's attention in
bounded score blocks equals the whole-matrix attention."""
from __future__ import annotations

import ctypes
import os

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.memory import expert_caches
from moemesh.engine.sampling_params import SamplingParams
from moemesh.errors import PromptTooLong
from moemesh.experts.budget import RUNTIME_OVERHEAD
from moemesh.kvcache.dense import DenseKVCache
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model

PROMPT = [(7 * i) % 90 + 5 for i in range(48)]


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    return convert(tiny_checkpoints["qwen3_moe-norm"][1], tmp_path_factory.mktemp("wm") / "s", "int4", progress=False)


def resident_pages(mem) -> int:
    """Bytes of ``mem`` (an mmap) resident in this process: mincore(2) over exactly its range. (Its
    /proc/self/smaps entry is not enough: the kernel may merge the mapping with a neighbouring anonymous
    one, whose pages its Rss then counts: that made this test fail in some full-suite runs.)"""
    start = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    page = os.sysconf("SC_PAGE_SIZE")
    n = (len(mem) + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(len(mem)), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(b & 1 for b in vec) * page


def lazy_engine(store, slots: int, reserve: int) -> tuple[Engine, object]:
    loaded = load_model(str(store), experts=ExpertOptions(slots=slots))
    (cache,) = [c for layer in loaded.model.layers if (c := getattr(getattr(layer.ffn, "provider", None), "cache", None))][:1]
    cache.reserve_bytes = reserve  # as a --ram plan leaves it (explicit slots alone lend nothing)
    return Engine(loaded.model, max_prefill_tokens=8), cache


def test_a_long_prompt_borrows_slots_and_gives_them_back(store):
    ref = Engine(load_model(str(store)).model, max_prefill_tokens=8).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=6))[0].output_ids
    engine, cache = lazy_engine(store, slots=40, reserve=0)  # (every expert of the tiny model)
    assert expert_caches(engine.model) == [cache] and engine.memory.active and engine.layer_major
    engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=30))  # fill the cache
    full, slots = resident_pages(cache._mem), cache.capacity
    assert cache.num_slots == slots and full >= slots // 2 * cache.blob_size
    need = engine.memory.need(len(PROMPT) + 7, len(PROMPT))
    cache.reserve_bytes = max(0, need - (slots - cache.min_slots) * cache.blob_size // 2)  # lend about half
    need -= cache.reserve_bytes
    lent_during: list[int] = []
    out = engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=6),
                          on_token=lambda o: lent_during.append(len(cache.lent)))[0].output_ids
    assert out == ref  # lazy experts stay exact with fewer slots
    expect = min(slots - cache.min_slots, -(-need // cache.blob_size))
    assert max(lent_during) >= expect - 1 > 0  # the prompt's KV and activations came out of the cache
    assert cache.num_slots == slots and not cache.lent  # ... and went back when it finished
    for entry in cache.entries.values():  # prefetches still being read are not lent (limit never waits)
        if entry.future is not None:
            entry.future.exception()
    assert cache.limit(cache.min_slots) == cache.min_slots  # lent pages leave the process
    assert resident_pages(cache._mem) <= cache.min_slots * cache.blob_size < full


def test_a_prompt_that_cannot_fit_is_refused_with_sizes(store):
    engine, cache = lazy_engine(store, slots=8, reserve=0)
    room = (cache.capacity - cache.min_slots) * cache.blob_size
    cache.reserve_bytes = engine.memory.per_token * 20 - room - RUNTIME_OVERHEAD  # KV room: 20 tokens
    with pytest.raises(PromptTooLong, match=r"needs [\d.]+ MiB of KV cache, but --ram leaves at most [\d.]+ MiB"):
        engine.add_request(list(range(5, 90)) * 2, SamplingParams(max_tokens=4))
    engine.add_request(PROMPT[:4], SamplingParams(max_tokens=4))  # small ones still fit


def test_without_ram_nothing_is_lent(store):
    loaded = load_model(str(store), experts=ExpertOptions(slots=12))
    engine = Engine(loaded.model, max_prefill_tokens=8)
    assert not engine.memory.active
    engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=4))


@pytest.mark.parametrize("sinks", [False, True])
def test_attention_in_score_blocks_equals_one_block(sinks):
    torch.manual_seed(0)
    hq, hkv, dh, n, start = 8, 2, 16, 37, 20
    caches = [DenseKVCache(1, hkv, dh) for _ in range(2)]
    caches[1].score_block_bytes = 4 * hq * (start + n) * 5  # blocks of 5 query rows
    k0, v0 = torch.randn(start, hkv, dh), torch.randn(start, hkv, dh)
    q, k, v = torch.randn(n, hq, dh), torch.randn(n, hkv, dh), torch.randn(n, hkv, dh)
    sink = torch.randn(hq) if sinks else None
    outs = []
    for c in caches:
        c.add_sequence(0)
        c.begin(BatchLayout([0], [start]))
        c.attend(0, torch.randn(start, hq, dh), k0, v0, BatchLayout([0], [start]), 0.25, sinks=sink)
        c.end(BatchLayout([0], [start]))
        batch = BatchLayout([0], [n])
        c.begin(batch)
        outs.append(c.attend(0, q, k, v, batch, 0.25, window=24, sinks=sink))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
