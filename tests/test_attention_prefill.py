"""The blocked prefill attention kernel (quant/attention_prefill.c) against torch's masked softmax, and
its chunk invariance (a query's output does not depend on the chunk it is computed in)."""
from __future__ import annotations

import pytest
import torch

from moemesh.kvcache.base import causal_mask
from moemesh.kvcache.dense import DenseKVCache
from moemesh.quant import decode_kernels

lib = decode_kernels.load()
pytestmark = pytest.mark.skipif(lib is None, reason="the decode kernels could not be built")


def reference(q, keys, values, start, window, scale, sinks):
    """fp64 masked softmax (with the sink as an extra logit) over keys [Hkv, L, Dh]: q [n, Hq, Dh] -> [n, Hq, Dv]."""
    n, hq, _ = q.shape
    hkv = keys.shape[0]
    k = keys.double().repeat_interleave(hq // hkv, 0)  # [Hq, L, Dh]
    v = values.double().repeat_interleave(hq // hkv, 0)
    s = torch.einsum("nhd,hld->hnl", q.double(), k[:, : start + n]) * scale  # [Hq, n, L]
    s = s.masked_fill(~causal_mask(n, start, window) if n > 1 or window else torch.zeros(1, dtype=torch.bool),
                      float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(hq, 1, 1).expand(hq, n, 1)], -1)
    p = torch.softmax(s, -1)[..., : start + n]
    return torch.einsum("hnl,hld->nhd", p, v[:, : start + n]).float()


CASES = [  # hq, hkv, dh, dv, start, n, window, sinks, values in keys
    (8, 2, 64, 64, 0, 37, None, False, False),
    (64, 8, 64, 64, 150, 200, None, True, False),  # gpt-oss: sinks, full
    (64, 8, 64, 64, 150, 200, 128, True, False),  # gpt-oss: sinks, sliding window
    (32, 4, 128, 128, 70, 130, None, False, False),  # Qwen3
    (9, 3, 64, 64, 0, 65, None, False, False),  # SmolLM2 (a group of 3)
    (16, 1, 576, 512, 10, 40, None, False, True),  # MLA absorbed: one KV head, values in the keys
    (4, 4, 32, 48, 3, 90, 17, False, False),  # odd sizes: window shorter than a block, Dv 48
]


@pytest.mark.parametrize("hq,hkv,dh,dv,start,n,window,with_sinks,vik", CASES)
def test_prefill_kernel_matches_the_masked_softmax(hq, hkv, dh, dv, start, n, window, with_sinks, vik):
    g = torch.Generator().manual_seed(hq + dh + start)
    cap = start + n + 5
    keys = torch.randn(hkv, cap, dh, generator=g)
    values = keys if vik else torch.randn(hkv, cap, dv, generator=g)
    q = torch.randn(n, hq, dh, generator=g) * 2
    sinks = torch.randn(hq, generator=g) if with_sinks else None
    scale = dh**-0.5
    got = decode_kernels.attend_prefill(lib, q, keys, values, dv, start, window, scale, sinks)
    want = reference(q, keys, values[..., :dv], start, window, scale, sinks)
    assert got.shape == (n, hq, dv)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # chunk invariance: the same queries split at other boundaries give the same bits
    for cut in (1, n // 3, n - 1):
        a = decode_kernels.attend_prefill(lib, q[:cut], keys, values, dv, start, window, scale, sinks)
        b = decode_kernels.attend_prefill(lib, q[cut:], keys, values, dv, start + cut, window, scale, sinks)
        assert torch.equal(torch.cat([a, b]), got)


def test_prefill_kernel_handles_a_strided_query_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 40, 32, generator=g), torch.randn(2, 40, 32, generator=g)
    qkv = torch.randn(30, 8, 32 * 3, generator=g)
    q = qkv[..., :32]  # a view: heads strided, Dh contiguous
    got = decode_kernels.attend_prefill(lib, q, keys, values, 32, 4, None, 0.2, None)
    torch.testing.assert_close(got, reference(q, keys, values, 4, None, 0.2, None), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="bad shapes"):  # the queries' positions run past the buffer
        decode_kernels.attend_prefill(lib, q, keys, values, 32, 20, None, 0.2, None)


@pytest.mark.parametrize("window,with_sinks", [(None, False), (None, True), (24, True), (24, False)])
def test_dense_cache_prefill_matches_its_torch_path(monkeypatch, window, with_sinks):
    """DenseKVCache.attend with the kernel vs with it disabled (the torch paths: causal_attention, the sinks'
    masked softmax, SDPA), over a prompt in two chunks."""
    from moemesh.batch import BatchLayout

    g = torch.Generator().manual_seed(2)
    hq, hkv, dh, n1, n2 = 8, 2, 64, 50, 70
    sinks = torch.randn(hq, generator=g) if with_sinks else None
    q = torch.randn(n1 + n2, hq, dh, generator=g)
    k = torch.randn(n1 + n2, hkv, dh, generator=g)
    v = torch.randn(n1 + n2, hkv, dh, generator=g)

    def run(native: bool) -> torch.Tensor:
        if not native:
            monkeypatch.setattr(decode_kernels, "prefill_usable", lambda *a: False)
        cache = DenseKVCache(1, hkv, dh)
        cache.add_sequence(0)
        outs = []
        for a, b in ((0, n1), (n1, n1 + n2)):
            batch = BatchLayout([0], [b - a])
            cache.begin(batch)
            outs.append(cache.attend(0, q[a:b], k[a:b], v[a:b], batch, dh**-0.5, window=window, sinks=sinks))
            cache.end(batch)
        monkeypatch.undo()
        return torch.cat(outs)

    torch.testing.assert_close(run(True), run(False), rtol=2e-5, atol=2e-5)
