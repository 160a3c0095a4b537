"""TurboQuantKVCache: attention from codes vs the dequantize reference, native kernel vs torch,
window bookkeeping, memory, and the engine (continuous batching) on tiny checkpoints."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kvcache.dense import DenseKVCache
from moemesh.kvcache.spec import parse_kv_spec
from moemesh.kvcache.tq_native import load_native
from moemesh.kvcache.turboquant import TurboQuantKVCache
from moemesh.layers.batch import BatchLayout
from moemesh.models.loader import load_model

HAS_NATIVE = load_native() is not None
# (seq_id, query tokens) per step: prefill chunks with and without a prefix, several sequences of
# different lengths in one batch, single-token decode steps, a sequence joining late
STEPS = [[(0, 70), (1, 5)], [(0, 1), (1, 13), (2, 40)], [(0, 1), (1, 1), (2, 1)], [(2, 9), (0, 1)], [(1, 1), (2, 1)]]


def run_steps(caches: dict, layers: int, hq: int, hkv: int, dh: int, window: int | None, seed: int = 0) -> dict:
    """Feed the same random q/k/v through every cache; returns name -> list of outputs."""
    g = torch.Generator().manual_seed(seed)
    outs = {name: [] for name in caches}
    for c in caches.values():
        for sid in (0, 1, 2):
            c.add_sequence(sid)
    for step in STEPS:
        b = BatchLayout([s for s, _ in step], [n for _, n in step])
        t = b.num_tokens
        q, k, v = torch.randn(t, hq, dh, generator=g), torch.randn(t, hkv, dh, generator=g) * 3, torch.randn(t, hkv, dh, generator=g)
        for name, c in caches.items():
            c.begin(b)
            outs[name] += [c.attend(layer, q, k, v, b, dh**-0.5, window) for layer in range(layers)]
            c.end(b)
    return outs


@pytest.mark.parametrize("bits", [2, 2.5, 3, 3.5, 4])
@pytest.mark.parametrize("window", [None, 6])  # the model's sliding window
def test_codes_path_equals_dequant_reference(bits, window):
    """GQA (9 q heads on 3 kv heads), batches of sequences with different lengths, prefill chunks
    over a coded prefix, decode steps, sliding window: both attention paths agree."""
    kw = dict(bits=bits, window=4)
    caches = {
        "dequant": TurboQuantKVCache(2, 3, 64, mode="dequant", **kw),
        "codes": TurboQuantKVCache(2, 3, 64, native=False, **kw),
    }
    if HAS_NATIVE:
        caches["native"] = TurboQuantKVCache(2, 3, 64, native=True, **kw)
    outs = run_steps(caches, 2, 9, 3, 64, window)
    for name in caches:
        for got, ref in zip(outs[name], outs["dequant"]):
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    if HAS_NATIVE:  # the C packer writes the very same codes as the torch encoder
        for sid, seq in caches["native"].seqs.items():
            ref = caches["codes"].seqs[sid]
            assert seq.coded == ref.coded
            for a, b in zip(seq.layers, ref.layers):
                n = seq.coded
                assert torch.equal(a.hist.k_codes[..., :n], b.hist.k_codes[..., :n])
                assert torch.equal(a.hist.v_codes[..., :n], b.hist.v_codes[..., :n])
                assert torch.equal(a.hist.v_norms[:, :n], b.hist.v_norms[:, :n])


@pytest.mark.parametrize("dh,hq,hkv", [(12, 4, 2), (20, 2, 1), (128, 4, 4)])
def test_other_head_dims(dh, hq, hkv):
    """Non-power-of-two head dims (Haar rotation, padded bit planes) and MHA."""
    caches = {"dequant": TurboQuantKVCache(1, hkv, dh, bits=3.5, window=3, mode="dequant")}
    caches["codes"] = TurboQuantKVCache(1, hkv, dh, bits=3.5, window=3, native=False)
    if HAS_NATIVE:
        caches["native"] = TurboQuantKVCache(1, hkv, dh, bits=3.5, window=3, native=True)
    outs = run_steps(caches, 1, hq, hkv, dh, None)
    for name in caches:
        for got, ref in zip(outs[name], outs["dequant"]):
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_within_the_window_it_is_the_dense_cache():
    caches = {"dense": DenseKVCache(2, 3, 64), "tq": TurboQuantKVCache(2, 3, 64, bits=2, window=1000)}
    outs = run_steps(caches, 2, 9, 3, 64, None)
    for got, ref in zip(outs["tq"], outs["dense"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert all(s.coded == 0 for s in caches["tq"].seqs.values())


def test_window_bookkeeping_and_free():
    c = TurboQuantKVCache(2, 3, 64, bits=3, window=8)
    outs = run_steps({"tq": c}, 2, 9, 3, 64, None)
    assert all(torch.isfinite(o).all() for o in outs["tq"])
    for seq in c.seqs.values():
        assert seq.coded == max(0, seq.length - 8)
        for st in seq.layers:
            assert st.win_k.shape == (3, seq.length - seq.coded, 64) == st.win_v.shape
            assert st.hist.k_codes.shape[2] >= seq.coded
    before = c.nbytes()
    c.free_sequence(0)
    assert c.nbytes() < before
    with pytest.raises(ValueError):
        c.add_sequence(1)


def test_window_zero_codes_everything_but_the_current_chunk():
    caches = {"dequant": TurboQuantKVCache(1, 2, 64, bits=4, window=0, mode="dequant"),
              "codes": TurboQuantKVCache(1, 2, 64, bits=4, window=0)}
    outs = run_steps(caches, 1, 4, 2, 64, None)
    for got, ref in zip(outs["codes"], outs["dequant"]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert all(s.coded == s.length for s in caches["codes"].seqs.values())


def test_memory_at_4k_is_4x_below_bf16():
    """Bytes per token per layer from the real buffers (codes, float16 norms, fp32 window of 32,
    capacity included) at 4096 tokens, SmolLM2's shapes, 3.5 bits."""
    hkv, dh, n = 3, 64, 4096
    c = TurboQuantKVCache(1, hkv, dh, bits=3.5)
    c.add_sequence(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(n // 512):
        b = BatchLayout([0], [512])
        c.begin(b)
        c.attend(0, torch.randn(512, 9, dh, generator=g), torch.randn(512, hkv, dh, generator=g),
                 torch.randn(512, hkv, dh, generator=g), b, dh**-0.5)
        c.end(b)
    per_token = c.nbytes() / n
    bf16 = 2 * 2 * hkv * dh  # K and V, 2 bytes per value
    assert per_token == 2 * hkv * (28 + 2) + 2 * hkv * 32 * dh * 4 / n  # codes + norms, window amortised
    assert bf16 / per_token >= 4.0


def test_kv_spec_parsing():
    assert str(parse_kv_spec("dense")) == "dense"
    assert str(parse_kv_spec("TurboQuant:2.5")) == "turboquant:2.5:32"
    assert str(parse_kv_spec("turboquant:4:128")) == "turboquant:4:128"
    for bad in ("turboquant", "turboquant:3.3", "turboquant:x", "turboquant:3:-1", "int8"):
        with pytest.raises(ValueError):
            parse_kv_spec(bad)


def test_generate_rejects_bad_kv():
    r = subprocess.run([sys.executable, "-m", "moemesh.cli", "generate", "smollm2", "--prompt", "hi", "--kv", "turboquant:5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--kv" in r.stderr and "Traceback" not in r.stderr


def prompt(seed: int, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3_moe-norm"])
def test_engine_continuous_batching_with_turboquant(tiny_checkpoints, name):
    """Sequences of different lengths join and leave the batch; each gets the tokens it gets
    alone. With a window covering everything the cache is exact: same tokens as dense."""
    _, d = tiny_checkpoints[name]
    model = load_model(str(d), "fp32").model
    v = model.args.vocab_size
    prompts = [prompt(10, 5, v), prompt(11, 30, v), prompt(12, 2, v)]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    kv = "turboquant:3:4"
    alone = [Engine(model, cache=model.new_cache(kv)).generate([p], params)[0].output_ids for p in prompts]
    engine = Engine(model, cache=model.new_cache(kv), max_batch=2, max_prefill_tokens=8)
    together = [s.output_ids for s in engine.generate(prompts, params)]
    assert together == alone
    assert engine.cache.nbytes() == 0  # every finished sequence was freed
    dense = [s.output_ids for s in Engine(model).generate(prompts, params)]
    exact = [s.output_ids for s in Engine(model, cache=model.new_cache("turboquant:2:1000")).generate(prompts, params)]
    assert exact == dense
