"""One DeepSeek-V2-Lite-shaped MLA layer (D 2048, 16 heads, kv_lora 512, rope 64, nope 128, v 128),
random weights: decode-step time and KV bytes, absorbed (latent cache) vs naive (per-head K/V).

Usage: python bench/mla_decode.py [THREADS] [CONTEXT]
"""
from __future__ import annotations

import argparse
import time

import torch

from moemesh.batch import BatchLayout
from moemesh.layers.mla import MLAConfig, MultiHeadLatentAttention, latent_cache, naive_cache
from moemesh.layers.norm import RMSNorm
from moemesh.layers.rope import RotaryEmbedding
from moemesh.quant.qlinear import QuantLinear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("threads", type=int, nargs="?", default=1, help="torch threads (default 1)")
    ap.add_argument("context", type=int, nargs="?", default=1024, help="tokens in the cache before decoding (default 1024)")
    a = ap.parse_args()
    threads, ctx = a.threads, a.context
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d, h, steps = 2048, 16, 32
    cfg = MLAConfig(None, 512, 128, 64, 128)

    def lin(o: int, i: int) -> QuantLinear:
        return QuantLinear.from_float(torch.randn(o, i) * i**-0.5, None, "fp32")

    layer = MultiHeadLatentAttention(0, cfg, h, lin(h * cfg.qk_head_dim, d), None, None, lin(cfg.latent_dim, d),
                                     RMSNorm(torch.ones(512), 1e-6), torch.randn(h * 256, 512) * 512**-0.5,
                                     lin(d, h * cfg.v_head_dim))
    rope = RotaryEmbedding(cfg.qk_rope_head_dim, 10000.0)
    for absorb in (True, False):
        layer.absorb = absorb
        cache = latent_cache("dense", 1, cfg) if absorb else naive_cache(1, h, cfg)
        cache.add_sequence(0)
        times = []
        with torch.inference_mode():
            for start, n in [(0, ctx)] + [(ctx + i, 1) for i in range(steps)]:
                b = BatchLayout([0], [n])
                cos, sin = rope.cos_sin(torch.arange(start, start + n))
                t = time.perf_counter()
                cache.begin(b)
                layer(torch.randn(n, d), cos, sin, cache, b)
                cache.end(b)
                if n == 1:
                    times.append(time.perf_counter() - t)
        times.sort()
        per_token = cache.nbytes() / cache.seqs[0].keys[0].shape[1]  # bytes per token of capacity
        print(f"{'absorbed' if absorb else 'naive   '}: decode step median {times[len(times) // 2] * 1e3:.2f} ms "
              f"at context {ctx}, {threads} thread(s); KV {per_token:.0f} bytes/token/layer")


if __name__ == "__main__":
    main()
