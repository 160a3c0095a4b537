"""The C steps between the matmuls (quant/decode_kernels.c) against their torch references: RMSNorm
(F.rms_norm), the rotary embedding (apply_rope, bit for bit) and one decode token's attention
(kvcache.decode_attention: GQA, sinks, a sliding window, MLA's values inside the keys, the threaded
path at long contexts)."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.kvcache.decode_attention import decode_attention
from moemesh.kvcache.dense import DenseKVCache
from moemesh.layers.norm import RMSNorm
from moemesh.layers.rope import RotaryEmbedding, apply_rope, apply_rope_
from moemesh.quant import decode_kernels as dk

LIB = dk.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler / decode kernels disabled")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@needs_lib
@pytest.mark.parametrize("shape", [(1, 576), (7, 2048), (3, 4, 128), (1, 37)])
def test_rms_norm_matches_torch(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    norm = RMSNorm(1 + 0.2 * torch.randn(shape[-1], generator=g), 1e-6)
    got, want = norm(x), norm.reference_forward(x)
    assert got.shape == want.shape and rel(got, want) < 1e-6
    # rows are independent: one row alone gives its bits inside a batch
    assert torch.equal(norm(x.reshape(-1, shape[-1])[1:2]), norm(x).reshape(-1, shape[-1])[1:2])
    # a strided view (rows of a wider tensor) reads the right elements
    wide = torch.randn(5, 2 * shape[-1], generator=g)
    assert rel(norm(wide[:, : shape[-1]]), norm.reference_forward(wide[:, : shape[-1]])) < 1e-6


@needs_lib
@pytest.mark.parametrize("t,h,dh", [(1, 9, 64), (5, 3, 128), (2, 4, 12)])
def test_rope_in_place_is_bitwise_torch(t, h, dh):
    g = torch.Generator().manual_seed(1)
    cos, sin = RotaryEmbedding(dh, 10000.0).cos_sin(torch.randint(0, 4000, (t,), generator=g))
    qkv = torch.randn(t, 3 * h * dh, generator=g)
    x = qkv[:, h * dh : 2 * h * dh].view(t, h, dh)  # a strided view, as Attention passes k
    want = apply_rope(x, cos, sin)
    got = apply_rope_(x, cos, sin)
    assert got.data_ptr() == x.data_ptr() and torch.equal(got, want)


def attend_both(hq, hkv, dh, dv, n, window, sinks, values_in_keys, threads=1):
    """Prefill n tokens into two caches, then one decode token: the C path vs the torch reference."""
    g = torch.Generator().manual_seed(2)
    caches = [DenseKVCache(1, hkv, dh, value_dim=dv, values_in_keys=values_in_keys) for _ in range(2)]
    q, k, v = torch.randn(n, hq, dh, generator=g), torch.randn(n, hkv, dh, generator=g), torch.randn(n, hkv, dv, generator=g)
    q1, k1, v1 = torch.randn(1, hq, dh, generator=g), torch.randn(1, hkv, dh, generator=g), torch.randn(1, hkv, dv, generator=g)
    outs = []
    torch.set_num_threads(threads)
    try:
        for c, native in zip(caches, [True, False]):
            with pytest.MonkeyPatch.context() as mp:
                if not native:  # the torch reference
                    mp.setattr(dk, "load", lambda: None)
                c.add_sequence(0)
                for qq, kk, vv, m in ((q, k, v, n), (q1, k1, v1, 1)):
                    b = BatchLayout([0], [m])
                    c.begin(b)
                    o = c.attend(0, qq, kk, None if values_in_keys else vv, b, 0.2, window, sinks)
                    c.end(b)
                outs.append(o)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(caches[0].seqs[0].keys[0][:, : n + 1], caches[1].seqs[0].keys[0][:, : n + 1])
    return outs


@needs_lib
@pytest.mark.parametrize("hq,hkv,dh,dv,n,window,sink,vik", [
    (9, 3, 64, 64, 50, None, False, False),  # SmolLM2's heads
    (4, 4, 16, 16, 7, None, True, False),  # MHA with sinks
    (6, 2, 8, 8, 20, 5, True, False),  # sliding window + sinks (gpt-oss)
    (4, 1, 36, 32, 11, None, False, True),  # MLA: one KV head, values = the keys' first 32
    (8, 2, 64, 64, 3000, None, False, False),  # long enough for the threaded path
])
def test_one_token_attention_matches_the_reference(hq, hkv, dh, dv, n, window, sink, vik):
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(3)) if sink else None
    for threads in (1, 2):
        c_out, ref = attend_both(hq, hkv, dh, dv, n, window, sinks, vik, threads)
        assert rel(c_out, ref) < 2e-6, (threads, rel(c_out, ref))


@needs_lib
@pytest.mark.parametrize("sink", [False, True])
def test_threads_split_by_query_head_give_the_same_bits(sink):
    # 3 KV heads on 2 threads run as 9 single-head units (an even split), 4 on 2 as KV groups: either way
    # each head's arithmetic is the one-thread result, bit for bit
    for hq, hkv in ((9, 3), (8, 4)):
        sinks = torch.randn(hq, generator=torch.Generator().manual_seed(5)) if sink else None
        one = attend_both(hq, hkv, 64, 64, 400, None, sinks, False, threads=1)[0]
        two = attend_both(hq, hkv, 64, 64, 400, None, sinks, False, threads=2)[0]
        assert torch.equal(one, two), (hq, hkv)


def test_reference_is_the_softmax_formula():
    """decode_attention (the kernels' reference) against the textbook formula with repeated K/V."""
    g = torch.Generator().manual_seed(4)
    q, keys, values = torch.randn(6, 8, generator=g), torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 5, generator=g)
    kr, vr = keys.repeat_interleave(3, 0), values.repeat_interleave(3, 0)  # [6, L, *]
    p = torch.softmax(torch.einsum("hd,hld->hl", q, kr) * 0.3, -1)
    assert torch.allclose(decode_attention(q, keys, values, 0.3), torch.einsum("hl,hlv->hv", p, vr), atol=1e-6)


@needs_lib
@pytest.mark.parametrize("t,h,k,n", [(1, 128, 128, 512), (3, 4, 40, 24), (5, 2, 512, 128), (9, 3, 72, 40)])
def test_per_head_int8_products_match_the_reference(t, h, k, n):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(h, n, k, generator=g)
    q8, s8 = dk.quantize_rows_i8(w)
    assert rel(q8.float() * s8[..., None], w) < 0.01  # int8 per row: ~0.3% of the weights' norm
    x = torch.randn(t, 2 * h, k, generator=g)[:, ::2]  # strided heads, as a view of a bigger tensor
    got = dk.heads_i8(LIB, x, q8, s8)
    assert rel(got, dk.heads_i8_reference(x, q8, s8)) < 1e-6
    for i in range(t):  # a token's bits do not depend on the batch (tokens in fours share loads, not sums)
        assert torch.equal(dk.heads_i8(LIB, x[i : i + 1], q8, s8), got[i : i + 1])


@needs_lib
def test_greedy_step_equals_the_samplers_reference(monkeypatch):
    """The sampler's one-pass greedy path (argmax + its log-probability in C) against its own torch path:
    the same tokens (ties to the lowest id, as torch.argmax), log-probabilities within float rounding."""
    from moemesh.engine.sampler import Sampler
    from moemesh.engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 49152, generator=g) * 4
    logits[1, 7] = logits[1, 9000] = logits[1].max() + 1  # a tie: the lower id wins
    logits[2, 30] = float("-inf")
    params = [SamplingParams(temperature=0.0)] * 4
    args = (params, [[1]] * 4, [[2]] * 4, [None] * 4)
    fast = Sampler().sample(logits, *args)
    monkeypatch.setattr(dk, "load", lambda: None)
    ref = Sampler().sample(logits, *args)
    assert fast.token_ids == ref.token_ids and fast.token_ids[1] == 7
    # torch's float log_softmax carries up to ~2e-5 of rounding at this vocabulary; the C pass sums in double
    exact = (logits.double() - logits.double().logsumexp(-1, keepdim=True)).gather(1, torch.tensor(fast.token_ids)[:, None])
    assert fast.logprobs == pytest.approx(exact[:, 0].tolist(), abs=1e-6)
    assert fast.logprobs == pytest.approx(ref.logprobs, abs=5e-5)
    assert fast.top_logprobs is ref.top_logprobs is None
    monkeypatch.undo()
    # a row asking for logprobs, a penalty or sampling takes the full path
    mixed = [SamplingParams(temperature=0.0, logprobs=2)] + params[1:]
    assert Sampler().sample(logits, mixed, *args[1:]).top_logprobs is not None


@needs_lib
@pytest.mark.parametrize("hq,hkv,dh,dv,window,sink,vik", [
    (9, 3, 64, 64, None, False, False),  # SmolLM2's heads
    (6, 2, 8, 8, 5, True, False),  # sliding window + sinks (gpt-oss)
    (4, 1, 36, 32, None, False, True),  # MLA: values are the keys' first 32
])
def test_batched_decode_step_gives_each_sequence_its_own_bits(hq, hkv, dh, dv, window, sink, vik):
    """A decode step of several sequences (lengths 3 .. 900, so some caches grew) is one attend_batch call;
    each sequence's output and cache equal the same token attended alone, on 1 and 2 threads."""
    g = torch.Generator().manual_seed(7)
    sinks = torch.randn(hq, generator=g) if sink else None
    lens = [3, 900, 40, 17, 260]
    prompts = [(torch.randn(n, hq, dh, generator=g), torch.randn(n, hkv, dh, generator=g),
                torch.randn(n, hkv, dv, generator=g)) for n in lens]
    step = [torch.randn(len(lens), h, w, generator=g) for h, w in ((hq, dh), (hkv, dh), (hkv, dv))]

    def run(batched: bool, threads: int) -> tuple[torch.Tensor, DenseKVCache]:
        c = DenseKVCache(1, hkv, dh, value_dim=dv, values_in_keys=vik)
        for sid, (q, k, v) in enumerate(prompts):
            c.add_sequence(sid)
            b = BatchLayout([sid], [q.shape[0]])
            c.begin(b)
            c.attend(0, q, k, None if vik else v, b, 0.2, window, sinks)
            c.end(b)
        torch.set_num_threads(threads)
        try:
            q, k, v = step
            if batched:
                b = BatchLayout(list(range(len(lens))), [1] * len(lens))
                c.begin(b)
                out = c.attend(0, q, k, None if vik else v, b, 0.2, window, sinks)
                c.end(b)
                return out, c
            outs = []
            for sid in range(len(lens)):
                b = BatchLayout([sid], [1])
                c.begin(b)
                outs.append(c.attend(0, q[sid : sid + 1], k[sid : sid + 1], None if vik else v[sid : sid + 1], b, 0.2,
                                     window, sinks))
                c.end(b)
            return torch.cat(outs), c
        finally:
            torch.set_num_threads(2)

    alone, ca = run(False, 1)
    for threads in (1, 2):
        together, cb = run(True, threads)
        assert torch.equal(together, alone), threads
        for sid, n in enumerate(lens):
            assert torch.equal(ca.seqs[sid].keys[0][:, : n + 1], cb.seqs[sid].keys[0][:, : n + 1])
            if not vik:
                assert torch.equal(ca.seqs[sid].values[0][:, : n + 1], cb.seqs[sid].values[0][:, : n + 1])


@needs_lib
def test_head_rescore_recomputes_the_references_candidates():
    """The approximate head's rescoring in one C pass (head_kernels.c) against OutputHead.rescore_reference
    (topk, einsum, scatter): the same entries replaced, by the same exact dot products up to summation
    order; ties go to the lower index; a NaN row is declined and left untouched."""
    from moemesh.layers.head import OutputHead

    lib = dk.load()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 64, generator=g)
    x = torch.randn(3, 64, generator=g)
    approx = x @ w.T + 0.05 * torch.randn(3, 5000, generator=g)  # [3, V] a quantized head's error
    head = OutputHead(w, approx=torch.nn.Identity(), rescore=16)
    got, want = approx.clone(), head.rescore_reference(x, approx.clone())
    assert dk.head_rescore(lib, got, x, w, 16)
    assert torch.equal(got != approx, want != approx) and int((got != approx).sum()) == 3 * 16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    wb = w.to(torch.bfloat16)  # a bf16 table (a checkpoint's own embedding): widened exactly, the same dots
    head_b = OutputHead(wb, approx=torch.nn.Identity(), rescore=16)
    got, want = approx.clone(), head_b.rescore_reference(x, approx.clone())
    assert dk.head_rescore(lib, got, x, wb, 16)
    assert torch.equal(got != approx, want != approx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not dk.head_rescore(lib, approx.clone(), x, w.half(), 16)  # fp16: declined (the reference runs)

    ties = torch.zeros(1, 100)
    assert dk.head_rescore(lib, ties, x[:1], w[:100], 4)
    assert (ties[0, :4] != 0).all() and (ties[0, 4:] == 0).all()  # equal values: the lowest indices

    bad = approx[:1].clone()
    bad[0, 7] = float("nan")
    before = bad.clone()
    assert not dk.head_rescore(lib, bad, x[:1], w, 16)
    assert torch.equal(bad.nan_to_num(), before.nan_to_num())
    assert not dk.head_rescore(lib, approx[:1].clone(), x[:1], w, 65)  # more candidates than it keeps
