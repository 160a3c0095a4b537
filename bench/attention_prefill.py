"""A prompt chunk's attention: the blocked C kernel (quant/attention_prefill.c) vs the torch paths it replaced.

One 512-query chunk of a long prompt against all the keys before it, per model shape (one layer):

* ``gpt-oss-120b``: 64 query / 8 KV heads of 64, sinks: torch's path was kvcache/sinks.attend_with_sinks
  (scores, mask, the sink column, softmax, values) over query blocks of kvcache/dense.py's size;
* ``gpt-oss-120b window``: the same with the 128-token sliding window (keys no query sees left out);
* ``qwen3-30b-a3b``: 32 / 4 heads of 128, plain causal: kvcache/causal_attention.py;
* ``smollm2``: 9 / 3 heads of 64: causal_attention.py;
* ``deepseek-v3 (MLA)``: 128 query heads over one latent KV head of 576 (values: its first 512): causal_attention.py.

Positions ``--starts`` (the chunk's first query; 7,680 = the last chunk of an 8,192-token prompt).
Both run in this process, alternating, ``--rounds`` each; medians. GMAC/s counts the multiply-adds of
the visible scores and values (the kernel skips nothing else; torch's paths compute masked scores too).
The outputs are compared (max abs difference: fp32 rounding, another summation order).

    .venv/bin/python bench/attention_prefill.py [--starts 1536,7680] [--rounds 5] [--threads 2]

Writes bench/results/attention_prefill.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from moemesh.kvcache.base import causal_mask
from moemesh.kvcache.causal_attention import causal_attention
from moemesh.kvcache.dense import SCORE_BLOCK_BYTES
from moemesh.kvcache.sinks import attend_with_sinks
from moemesh.quant import decode_kernels

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # name: (Hq, Hkv, Dh, Dv, window, sinks)
    "gpt-oss-120b": (64, 8, 64, 64, None, True),
    "gpt-oss-120b window": (64, 8, 64, 64, 128, True),
    "qwen3-30b-a3b": (32, 4, 128, 128, None, False),
    "smollm2": (9, 3, 64, 64, None, False),
    "deepseek-v3 (MLA)": (128, 1, 576, 512, None, False),
}


def torch_path(q, keys, values, start, window, scale, sinks):
    """What DenseKVCache.attend ran before the kernel: q [Hq, n, Dh] -> [Hq, n, Dv]."""
    hq, n, _ = q.shape
    end = start + n
    lo = 0 if window is None else max(0, start - window + 1)
    rows = max(1, SCORE_BLOCK_BYTES // (4 * hq * (end - lo)))
    if sinks is None and window is None:
        return causal_attention(q, keys, values, start, scale, rows)
    mask = causal_mask(n, start, window)[:, lo:]
    return torch.cat([attend_with_sinks(q[:, r : r + rows], keys[:, lo:end], values[:, lo:end], mask[r : r + rows],
                                        scale, sinks) for r in range(0, n, rows)], dim=1)


def run_shape(name: str, start: int, n: int, rounds: int, lib) -> dict:
    hq, hkv, dh, dv, window, with_sinks = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    end = start + n
    keys = torch.randn(hkv, end, dh, generator=g)
    values = keys[..., :dv] if dh != dv else torch.randn(hkv, end, dv, generator=g)
    q = torch.randn(n, hq, dh, generator=g)
    qh = q.transpose(0, 1).contiguous()  # [Hq, n, Dh] for torch's path
    sinks = torch.randn(hq, generator=g) if with_sinks else None
    scale = dh**-0.5
    arms = {"torch": lambda: torch_path(qh, keys, values, start, window, scale, sinks).transpose(0, 1),
            "kernel": lambda: decode_kernels.attend_prefill(lib, q, keys, keys if dh != dv else values, dv, start,
                                                            window, scale, sinks)}
    diff = (arms["kernel"]() - arms["torch"]()).abs().max().item()
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(rounds):
        for a in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t0 = time.perf_counter()
            arms[a]()
            times[a].append(time.perf_counter() - t0)
    visible = sum(min(start + i + 1, window or start + i + 1) for i in range(n))  # keys seen, summed over queries
    macs = hq * visible * (dh + dv)
    med = {a: statistics.median(t) for a, t in times.items()}
    return {"shape": name, "start": start, "queries": n, "max_abs_diff": diff, "gmacs": macs / 1e9,
            **{f"{a}_s": med[a] for a in arms}, **{f"{a}_all_s": times[a] for a in arms},
            **{f"{a}_gmac_s": macs / med[a] / 1e9 for a in arms}, "speedup": med["torch"] / med["kernel"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", default="1536,7680")
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = decode_kernels.load()
    if lib is None:
        raise SystemExit("the decode kernels could not be built (no C compiler?)")
    rows = []
    for name in args.shapes.split(","):
        for start in (int(s) for s in args.starts.split(",")):
            rows.append(run_shape(name, start, args.queries, args.rounds, lib))
            r = rows[-1]
            print(f"{name:20s} start {start:5d}: torch {r['torch_s'] * 1e3:7.1f} ms ({r['torch_gmac_s']:5.1f} GMAC/s)  "
                  f"kernel {r['kernel_s'] * 1e3:7.1f} ms ({r['kernel_gmac_s']:5.1f})  {r['speedup']:.2f}x  "
                  f"max diff {r['max_abs_diff']:.1e}", flush=True)
    out = {"argv": ["bench/attention_prefill.py", *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()]],
           "machine": platform.processor() or platform.machine(), "threads": args.threads,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_prefill.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Prefill attention: blocked C kernel vs the torch paths ({out['date']})", "",
             f"`.venv/bin/python bench/attention_prefill.py --starts {args.starts} --rounds {args.rounds} "
             f"--threads {args.threads}`; one {args.queries}-query chunk at each start, one layer, alternating, "
             "medians. GMAC/s = visible scores' and values' multiply-adds per second.", "",
             "| shape | chunk start | torch ms | torch GMAC/s | kernel ms | kernel GMAC/s | speedup | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['start']} | {r['torch_s'] * 1e3:.1f} | {r['torch_gmac_s']:.1f} | "
                     f"{r['kernel_s'] * 1e3:.1f} | {r['kernel_gmac_s']:.1f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    (RESULTS / "attention_prefill.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
