"""Block-format expert kernels (quant/blocks_*.c): decode GB/s of weight streamed, per qtype.

On the real expert shapes of gpt-oss-120b (D=2880, I=2880: the 32-block types and FP8; 2880 is not a
multiple of the K-quants' 256) and Qwen3-30B-A3B (D=2048, I=768: every type). Per qtype, ``--experts``
random experts (gate_up [2I, D] + down [D, I] each, well over the L3 in total) are run one token at a
time through BlockLinear (the C kernel); next to it, in alternating passes: a plain 2-thread read loop
over the same bytes (the memory floor, bench/readloop.c) and torch's fp32 matmul on the dequantized
weights (fewer experts: 4-8x the bytes). Also the prefill rate (M rows of one expert) in GMAC/s and
the fused one-token experts_mix vs the per-expert path. The machine is shared: numbers are indicative.

    PYTHONPATH=src .venv/bin/python bench/block_kernels.py [--quick] [--threads 2]

Writes bench/results/block_kernels.{json,md}.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from moemesh.quant.block_samples import random_rows
from moemesh.quant.blocks import BlockLinear, supported_qtypes
from moemesh.quant.blocks_ffn import expert_forward, experts_mix, sum_in_order
from moemesh.quant.native import BASE_FLAGS, load_library

RESULTS = Path(__file__).parent / "results"
MODELS = {"gpt-oss-120b": (2880, 2880, 4), "Qwen3-30B-A3B": (2048, 768, 8)}  # D, I, active experts
QUICK_TYPES = ("MXFP4", "Q4_K", "Q8_0", "Q6_K")


def fits(qtype: str, d: int, i: int) -> bool:
    return qtype == "FP8_E4M3_B128" or all(v % (256 if "K" in qtype or qtype == "IQ4_XS" else 32) == 0 for v in (d, i))


def make_experts(qtype: str, d: int, i: int, count: int) -> list[tuple[BlockLinear, BlockLinear]]:
    base = [random_rows(qtype, 2 * i, d, 1), random_rows(qtype, d, i, 2)]  # clones: same values, distinct memory
    return [(BlockLinear(qtype, base[0].clone(), d), BlockLinear(qtype, base[1].clone(), i)) for _ in range(count)]


def accuracy(lin: BlockLinear, m: int = 8) -> tuple[float, float]:
    """Relative L2 error vs x @ W_dequant.T in fp32: the kernel's, and (for scale) that of single-plane
    8-bit activations per 32 (llama.cpp's Q8 activations) on the same weights."""
    w = lin.dequantize()
    x = torch.randn(m, lin.in_features, generator=torch.Generator().manual_seed(0))
    ref = x @ w.T
    g = x.view(m, -1, 32)
    s = (g.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    y8 = (torch.round(g / s) * s).view(m, -1) @ w.T
    rel = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    return rel(lin(x)), rel(y8)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 qtypes, fewer experts and passes (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--mbytes", type=int, default=256, help="weight bytes per pass (MB), >> L3")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    passes, mbytes = (2, 48) if args.quick else (args.passes, args.mbytes)
    qtypes = QUICK_TYPES if args.quick else supported_qtypes()
    read = load_library("readloop", Path(__file__).parent, ("readloop.c",), list(BASE_FLAGS)).read_bytes
    read.argtypes, read.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int64
    rows, t_start, load0 = [], time.time(), os.getloadavg()
    for model, (d, i, active) in MODELS.items():
        for q in qtypes:
            if not fits(q, d, i):
                continue
            one = make_experts(q, d, i, 1)[0]
            nbytes = one[0].nbytes() + one[1].nbytes()
            experts = make_experts(q, d, i, max(active, mbytes * 2**20 // nbytes))
            dense = [(gu.dequantize(), dn.dequantize()) for gu, dn in experts[: max(2, len(experts) // 6)]]
            blob = torch.cat([t.raw.reshape(-1) for e in experts for t in e])
            x = torch.randn(1, d)
            xi = torch.randn(1, i)
            run = {
                "kernel": lambda: [(gu(x), dn(xi)) for gu, dn in experts],
                "read": lambda: read(blob.data_ptr(), blob.numel(), args.threads),
                "torch_fp32": lambda: [(x @ g.T, xi @ w.T) for g, w in dense],
            }
            per = {"kernel": len(experts), "read": len(experts), "torch_fp32": len(dense)}
            samples = {k: [] for k in run}
            for k in run:
                run[k]()  # warm-up
            for _ in range(passes):
                for k, fn in run.items():
                    samples[k].append(timed(fn) / per[k])
            us = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
            row = {"model": model, "qtype": q, "D": d, "I": i, "expert_bytes": nbytes,
                   "kernel_us": us["kernel"], "read_us": us["read"], "torch_fp32_us": us["torch_fp32"],
                   "kernel_GBps": nbytes / us["kernel"] / 1e3, "read_GBps": nbytes / us["read"] / 1e3,
                   "torch_fp32_GBps": 4 * 3 * d * i / us["torch_fp32"] / 1e3}
            gu, dn = experts[0]
            for m in (64,) if args.quick else (64, 256):
                xm = torch.randn(m, d)
                t = min(timed(lambda: gu(xm)) for _ in range(passes))
                tt = min(timed(lambda: xm @ dense[0][0].T) for _ in range(passes))
                row[f"prefill{m}_GMACs"] = m * 2 * i * d / t / 1e9
                row[f"prefill{m}_torch_fp32_GMACs"] = m * 2 * i * d / tt / 1e9
            row["rel_err"], row["rel_err_q8_act"] = accuracy(gu)
            sel = experts[:active]
            w = torch.softmax(torch.randn(active), 0)
            fused = min(timed(lambda: experts_mix(x, sel, w)) for _ in range(passes))
            loop = min(timed(lambda: sum_in_order(x, torch.cat([expert_forward(x, e) for e in sel]), w))
                       for _ in range(passes))
            row.update(fused_mix_us=fused * 1e6, per_expert_mix_us=loop * 1e6)
            rows.append(row)
            print(f"{model:14s} {q:14s} kernel {row['kernel_GBps']:6.2f} GB/s  read {row['read_GBps']:6.2f}  "
                  f"torch fp32 {row['torch_fp32_GBps']:6.2f}  prefill64 {row['prefill64_GMACs']:6.1f} GMAC/s "
                  f"(fp32 {row['prefill64_torch_fp32_GMACs']:5.1f})  mix {fused * 1e6:7.0f} us "
                  f"(per-expert {loop * 1e6:7.0f})", flush=True)
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "quick": args.quick, "mbytes_per_pass": mbytes, "passes": passes, "loadavg_before": load0,
            "loadavg_after": os.getloadavg(), "wall_s": round(time.time() - t_start, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "block_kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = ["# Block-format expert kernels: decode (M=1) weight streaming per qtype", "",
          f"{args.threads} threads; load average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after (shared "
          "machine: indicative). GB/s = the expert's raw bytes / time per expert (gate_up + down, one token); "
          "read = a plain read loop over the same bytes (the floor); torch fp32 = x @ W.T on the dequantized "
          "weights (GB/s of fp32 weight). Prefill: GMAC/s for M rows through one gate_up. Mix: one token through "
          "the model's active experts, fused C call vs the per-expert path. rel err: ||y - ref|| / ||ref|| vs the "
          "fp32 matmul on the dequantized weight (8 random rows), beside single-plane 8-bit activations' (Q8).", "",
          "| model | qtype | bytes/expert | kernel GB/s | read GB/s | kernel/read | torch fp32 GB/s | "
          "prefill 64 GMAC/s (fp32) | mix us (per-expert) | rel err (Q8 act) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['qtype']} | {r['expert_bytes'] / 2**20:.2f} MiB | {r['kernel_GBps']:.2f} | "
                  f"{r['read_GBps']:.2f} | {r['kernel_GBps'] / r['read_GBps']:.2f} | {r['torch_fp32_GBps']:.2f} | "
                  f"{r['prefill64_GMACs']:.1f} ({r['prefill64_torch_fp32_GMACs']:.1f}) | "
                  f"{r['fused_mix_us']:.0f} ({r['per_expert_mix_us']:.0f}) | "
                  f"{r['rel_err']:.1e} ({r['rel_err_q8_act']:.1e}) |")
    (RESULTS / "block_kernels.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
