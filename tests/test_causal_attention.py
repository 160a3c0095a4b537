"""kvcache/causal_attention.py against its reference, the masked SDPA (fp32 rounding apart), and the
dense cache's prefill taking it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.kvcache.base import causal_mask
from moemesh.kvcache.causal_attention import causal_attention


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
@pytest.mark.parametrize("start,n,rows", [(0, 37, 8), (50, 37, 16), (13, 5, 64), (0, 1, 4), (100, 64, 64)])
def test_matches_masked_sdpa(hq, hkv, start, n, rows):
    g = torch.Generator().manual_seed(start * 131 + n)
    dh, dv, cap = 16, 12, start + n + 9  # buffers longer than the keys in use, as a cache's are
    q = torch.randn(hq, n, dh, generator=g)
    keys, values = torch.randn(hkv, cap, dh, generator=g), torch.randn(hkv, cap, dv, generator=g)
    got = causal_attention(q, keys, values, start, 0.25, rows)  # [Hq, n, Dv]
    end = start + n
    want = F.scaled_dot_product_attention(q, keys[:, :end], values[:, :end], attn_mask=causal_mask(n, start, None),
                                          scale=0.25, enable_gqa=True)
    assert got.shape == (hq, n, dv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_dense_prefill_uses_it(monkeypatch, native):
    """Two chunks through the dense cache (at position 0, then after it): without the C prefill kernel
    (quant/attention_prefill.c) the cache takes this path, with it the kernel; either way each chunk's
    output is the masked SDPA over every key written so far."""
    from moemesh.batch import BatchLayout
    from moemesh.kvcache import dense
    from moemesh.quant import decode_kernels

    if native and decode_kernels.load() is None:
        pytest.skip("the decode kernels could not be built")
    if not native:
        monkeypatch.setattr(decode_kernels, "prefill_usable", lambda *a: False)
    calls = []
    real = dense.causal_attention
    monkeypatch.setattr(dense, "causal_attention", lambda *a: calls.append(a[3]) or real(*a))
    g = torch.Generator().manual_seed(0)
    cache = dense.DenseKVCache(num_layers=1, num_kv_heads=2, head_dim=16)
    cache.add_sequence(0)
    ks, vs, start = [], [], 0
    for n in (20, 11):
        q, k, v = (torch.randn(n, h, 16, generator=g) for h in (8, 2, 2))  # [T, H, Dh]
        batch = BatchLayout([0], [n])
        cache.begin(batch)
        got = cache.attend(0, q, k, v, batch, 0.25)  # [T, Hq, Dv]
        cache.end(batch)
        ks.append(k)
        vs.append(v)
        keys, values = torch.cat(ks).transpose(0, 1), torch.cat(vs).transpose(0, 1)  # [Hkv, start + n, Dh]
        want = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=causal_mask(n, start, None),
                                              scale=0.25, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        start += n
    assert calls == ([] if native else [0, 20])
