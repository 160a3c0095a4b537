"""TurboQuantKVCache: attention from codes vs the dequantize reference, native kernel vs torch,
window bookkeeping, memory, and the engine (continuous batching) on tiny checkpoints."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kvcache.dense import DenseKVCache
from moemesh.kvcache.spec import parse_kv_spec
from moemesh.kvcache.tq_attention import attend_codes
from moemesh.kvcache.tq_native import encode, load_native
from moemesh.kvcache.turboquant import TurboQuantKVCache
from moemesh.loading.loader import load_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Correctness tests of many small ops: one thread avoids OpenMP barrier stalls on a busy
    2-core machine (measured 13 s vs 2 s for one test); the thread count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


needs_native = pytest.mark.skipif(load_native() is None, reason="no C compiler / native kernels disabled")
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


@pytest.mark.parametrize("bits,window", [(2, None), (2.5, 6), (3, None), (3.5, None), (3.5, 6), (4, 6)])
def test_codes_path_equals_dequant_reference(bits, window):
    """GQA (9 q heads on 3 kv heads), batches of sequences with different lengths, prefill chunks
    over a coded prefix, decode steps, the model's sliding window: both attention paths agree."""
    kw = dict(bits=bits, window=4, native=False)
    caches = {"dequant": TurboQuantKVCache(2, 3, 64, mode="dequant", **kw), "codes": TurboQuantKVCache(2, 3, 64, **kw)}
    outs = run_steps(caches, 2, 9, 3, 64, window)
    for got, ref in zip(outs["codes"], outs["dequant"]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("bits,window,dh,hq,hkv", [
    (2, None, 64, 9, 3), (2.5, 6, 64, 9, 3), (3, None, 64, 8, 2), (3.5, 6, 64, 9, 3), (4, None, 64, 4, 4),
    (3.5, None, 128, 16, 2), (3.5, None, 12, 4, 2), (2.5, 5, 20, 2, 1),
])
def test_native_decode_step_equals_torch_codes_path(bits, window, dh, hq, hkv):
    """Every one-token step of the C kernel gives what the torch codes path computes from the
    same cache state (codes written by the C encoder), for every sequence and layer; prefill
    chunks go through torch attention over C-encoded codes."""
    check_native_steps(bits, window, dh, hq, hkv)


@needs_native
def test_native_decode_step_two_threads():
    """The kernel's OpenMP split (token chunks, query rows, octets) computes the same."""
    torch.set_num_threads(2)
    try:
        check_native_steps(3.5, None, 64, 9, 3, prefix=1500)
    finally:
        torch.set_num_threads(1)


@needs_native
def test_portable_c_loops(monkeypatch, tmp_path):
    """The kernels' scalar loops (what CPUs without AVX-512 run) compute the same."""
    monkeypatch.setenv("MOEMESH_TQ_CFLAGS", "-mno-avx512f")
    monkeypatch.setenv("MOEMESH_CACHE_DIR", str(tmp_path))
    if load_native() is None:
        pytest.skip("the compiler rejects -mno-avx512f")
    check_native_steps(3.5, 6, 64, 9, 3)
    check_native_steps(2.5, None, 20, 2, 1)
    assert list(tmp_path.glob("native/tq_native_*.so"))


def check_native_steps(bits, window, dh, hq, hkv, prefix=0):
    c = TurboQuantKVCache(2, hkv, dh, bits=bits, window=4, native=True)
    g = torch.Generator().manual_seed(1)
    for sid in (0, 1, 2):
        c.add_sequence(sid)
    checked = 0
    for step in ([[(0, prefix)]] if prefix else []) + STEPS:  # a long prefix spans several token chunks
        b = BatchLayout([s for s, _ in step], [n for _, n in step])
        t = b.num_tokens
        q, k, v = torch.randn(t, hq, dh, generator=g), torch.randn(t, hkv, dh, generator=g) * 3, torch.randn(t, hkv, dh, generator=g)
        c.begin(b)
        for layer in range(2):
            refs = {}
            for sid, off, n in zip(b.seq_ids, b.offsets, b.query_lens):
                seq = c.seqs[sid]
                st = seq.layers[layer]
                if n == 1:
                    ek = torch.cat([st.wk[:, : st.nw], k[off : off + 1].transpose(0, 1)], dim=1)
                    ev = torch.cat([st.wv[:, : st.nw], v[off : off + 1].transpose(0, 1)], dim=1)
                    refs[off] = attend_codes(c.quantizers[layer], q[off : off + 1], st.hist, seq.coded, ek, ev,
                                             seq.length, dh**-0.5, window)
            out = c.attend(layer, q, k, v, b, dh**-0.5, window)
            for off, ref in refs.items():
                torch.testing.assert_close(out[off : off + 1], ref, atol=2e-5, rtol=1e-5)
                checked += 1
        c.end(b)
    assert checked == 2 * sum(n == 1 for step in STEPS for _, n in step)  # + the prefix chunk, n > 1
    for seq in c.seqs.values():
        assert seq.coded == max(0, seq.length - 4) and all(st.nw == seq.length - seq.coded for st in seq.layers)


@needs_native
@pytest.mark.parametrize("bits,dh", [(2, 64), (2.5, 64), (3, 64), (3.5, 64), (4, 64), (3.5, 12), (2.5, 20)])
def test_native_encoder_equals_torch_encoder(bits, dh):
    """Codes and float16 norms from the C encoder match the torch encoder; the two compute the
    rotation in a different order, so a coordinate within float rounding of a boundary may flip."""
    c = TurboQuantKVCache(1, 3, dh, bits=bits, native=True)
    tq = c.quantizers[0]
    c.add_sequence(0)
    c.begin(BatchLayout([0], [600 + c.window]))
    st = c.seqs[0].layers[0]
    x = torch.randn(2, 3, 600, dh, generator=torch.Generator().manual_seed(2)) * torch.rand(2, 3, 600, 1) * 20
    encode(c.lib, c._view(0, st), x, 0, st.hist.k_norms.shape[1])
    words, norms = tq.encode(x)
    got = torch.stack([st.hist.k_codes[:, :, :600], st.hist.v_codes[:, :, :600]]).transpose(2, 3)  # [2, 3, 600, W]
    diff = (tq.layout.unpack(got) != tq.layout.unpack(words)).float().mean().item()
    assert diff < 1e-4, diff
    got_n = torch.stack([st.hist.k_norms[:, :600], st.hist.v_norms[:, :600]])
    assert ((got_n.float() - norms.float()).abs() <= norms.float() * 2**-10).all()  # at most 1 fp16 ulp


@pytest.mark.parametrize("dh,hq,hkv", [(12, 4, 2), (20, 2, 1), (128, 4, 4)])
def test_other_head_dims(dh, hq, hkv):
    """Non-power-of-two head dims (Haar rotation, padded bit planes) and MHA."""
    caches = {"dequant": TurboQuantKVCache(1, hkv, dh, bits=3.5, window=3, mode="dequant"),
              "codes": TurboQuantKVCache(1, hkv, dh, bits=3.5, window=3, native=False)}
    outs = run_steps(caches, 1, hq, hkv, dh, None)
    for got, ref in zip(outs["codes"], outs["dequant"]):
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
            assert st.nw == seq.length - seq.coded and st.wk.shape == (3, 9, 64) == st.wv.shape
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
    coded = n - 32  # the last 32 tokens are the exact window (buffer of 33: room for one more)
    assert per_token == (2 * hkv * (28 + 2) * coded + 2 * hkv * 33 * dh * 4) / n  # codes + fp16 norms, fp32 window
    assert bf16 / per_token >= 4.0


def test_kv_spec_parsing():
    assert str(parse_kv_spec("dense")) == "dense"
    assert str(parse_kv_spec("TurboQuant:2.5")) == "turboquant:2.5:32"
    assert str(parse_kv_spec("turboquant:4:128")) == "turboquant:4:128"
    for bad in ("turboquant", "turboquant:3.3", "turboquant:x", "turboquant:3:-1", "int8"):
        with pytest.raises(ValueError):
            parse_kv_spec(bad)


def test_generate_rejects_bad_kv(capsys):
    from moemesh.cli import main

    assert main(["generate", "smollm2", "--prompt", "hi", "--kv", "turboquant:5"]) == 2
    err = capsys.readouterr().err
    assert "--kv" in err and "turboquant:BITS" in err and "Traceback" not in err


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
