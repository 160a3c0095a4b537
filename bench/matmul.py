"""Matmul throughput on this CPU: fp32/bf16 F.linear vs torch's int8/int4 weight-only kernels.

Prints a GFLOP/s table (median of repeats) and writes bench/results/matmul.{json,md}.
Shapes are in->out (K->N); weights are random and stay cache-resident for the smaller
shapes, so M=1 numbers are optimistic for weights streamed from DRAM.

    .venv/bin/python bench/matmul.py [--ms 1,8,64,256] [--shapes 576x1536,...] [--budget-s 0.08]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moemesh.benchkit.results import cpu_model, write_results
from moemesh.quant.qlinear import NEVER, QuantLinear

SHAPES = [(576, 1536), (1536, 576), (2048, 768), (768, 2048), (576, 49152)]  # (in K, out N)
MAX_CALL_S = 0.5  # skip a cell whose predicted single call is slower than this (fp32-act kernels)
RESULTS = Path(__file__).parent / "results"


def time_call(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_interleaved(calls: dict[str, Callable[[], object]], budget_s: float) -> dict[str, list[float]]:
    """name -> seconds per call of each sample. Methods are timed in alternating rounds so a
    burst of load from other processes hits all of them rather than one; each sample batches
    enough calls to last ~1 ms."""
    inner = {}
    for name, fn in calls.items():
        fn()  # warm-up (allocator, oneDNN primitive cache)
        inner[name] = max(1, min(50, int(1e-3 / max(time_call(fn, 1), 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    t0 = time.perf_counter()
    while True:
        for name, fn in calls.items():
            samples[name].append(time_call(fn, inner[name]))
        n = len(next(iter(samples.values())))
        if n >= 25 or (n >= 3 and time.perf_counter() - t0 > budget_s * len(calls)):
            break
    return samples


class Weights:
    """One random [N, K] weight in every stored form the table compares."""

    def __init__(self, k: int, n: int) -> None:
        self.w = torch.randn(n, k)  # [N, K] fp32
        self.wb = self.w.bfloat16()
        self.q8 = QuantLinear.from_float(self.w, None, "int8")  # qweight int8 [N, K], scales [N]
        self.q4 = QuantLinear.from_float(self.w, None, "int4", 32)  # packed [N, K/2], sz [K/32, N, 2]
        self.s8 = {torch.float32: self.q8.scales, torch.bfloat16: self.q8.scales.bfloat16()}
        self.sz = {torch.float32: self.q4.scales_and_zeros.float(), torch.bfloat16: self.q4.scales_and_zeros}


def ql_call(layer: QuantLinear, min_m: int, x: torch.Tensor) -> Callable[[], object]:
    def call() -> torch.Tensor:
        layer.dequant_min_m = min_m  # the kernel and dequant variants share one layer
        return layer(x)
    return call


def calls(wt: Weights, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Zero-arg calls for x fp32 [M, K]; inputs are converted outside the timed call."""
    xb = x.bfloat16()
    q8, q4 = wt.q8.qweight, wt.q4.qweight
    f32, bf = torch.float32, torch.bfloat16
    return {
        "fp32 linear": lambda: F.linear(x, wt.w),
        "bf16 linear": lambda: F.linear(xb, wt.wb),
        "int8 kern f32-act": lambda: torch._weight_int8pack_mm(x, q8, wt.s8[f32]),
        "int8 kern bf16-act": lambda: torch._weight_int8pack_mm(xb, q8, wt.s8[bf]),
        "int4 kern f32-act": lambda: torch._weight_int4pack_mm_for_cpu(x, q4, 32, wt.sz[f32]),
        "int4 kern bf16-act": lambda: torch._weight_int4pack_mm_for_cpu(xb, q4, 32, wt.sz[bf]),
        "int4 dequant->f32 linear": lambda: F.linear(x, wt.q4._int4_weight(f32)),
        # QuantLinear end to end (fp32 in/out, casts and scales included), kernel vs dequant path
        "QL int8 kernel": ql_call(wt.q8, NEVER, x),
        "QL int8 dequant": ql_call(wt.q8, 0, x),
        "QL int4 kernel": ql_call(wt.q4, NEVER, x),
        "QL int4 dequant": ql_call(wt.q4, 0, x),
    }


def run(shapes: list[tuple[int, int]], ms: list[int], budget_s: float) -> list[dict]:
    torch.manual_seed(0)
    rows: list[dict] = []
    for k, n in shapes:
        wt = Weights(k, n)
        rate: dict[str, float] = {}  # last GFLOP/s seen per method, to predict slow cells
        for m in ms:
            x = torch.randn(m, k)  # [M, K]
            gflop = 2 * m * k * n / 1e9
            table = calls(wt, x)
            res = time_interleaved({nm: fn for nm, fn in table.items()
                                    if nm not in rate or gflop / rate[nm] <= MAX_CALL_S}, budget_s)
            for name in table:
                row = dict(shape=f"{k}->{n}", K=k, N=n, M=m, method=name, gflops=None, ms=None, samples=0,
                           gflops_best=None)
                if name in res:
                    sec = statistics.median(res[name])
                    rate[name] = gflop / sec
                    # best-of is listed too: under load from others it is the steadier estimate
                    row.update(gflops=round(gflop / sec, 2), ms=round(sec * 1e3, 4), samples=len(res[name]),
                               gflops_best=round(gflop / min(res[name]), 2))
                rows.append(row)
            print(f"  {k}->{n} M={m} done", flush=True)
    return rows


HOW = (f"Shape is in->out (K->N); GFLOP/s = 2*M*K*N / median seconds per call. '-' = skipped (predicted "
       f"> {MAX_CALL_S}s per call). QL = QuantLinear.forward, fp32 in/out (casts, scales, bias path included); "
       "'kernel' / 'dequant' force its two paths. Weights are cache-resident for the smaller shapes. "
       "matmul.json rows also carry gflops_best (fastest sample), steadier when others load the machine.\n")


def markdown(rows: list[dict], threads: int) -> str:
    names = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["M"]) for r in rows))
    cell = {(r["shape"], r["M"], r["method"]): r["gflops"] for r in rows}
    out = [f"## {threads} thread(s)\n", "| shape | M | " + " | ".join(names) + " |",
           "|---|---:|" + "---:|" * len(names)]
    for shape, m in keys:
        vals = [cell.get((shape, m, nm)) for nm in names]
        out.append(f"| {shape} | {m} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,8,64,256", help="comma-separated M (rows of x)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    ap.add_argument("--budget-s", type=float, default=0.08, help="timing budget per method and cell")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                    help="comma-separated torch thread counts, one table each (1 is steadier under load)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    meta = dict(torch=torch.__version__, cpu=cpu_model(), cores=os.cpu_count(),
                capability=torch.backends.cpu.get_cpu_capability(),
                avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
                loadavg_before=" ".join(f"{v:.1f}" for v in os.getloadavg()))
    t0 = time.perf_counter()
    shapes = [(int(k), int(n)) for k, n in (sh.split("x") for sh in a.shapes.split(","))]
    rows, md = [], ""
    for threads in dict.fromkeys(int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        part = [dict(r, threads=threads) for r in run(shapes, [int(m) for m in a.ms.split(",")], a.budget_s)]
        rows += part
        md += markdown(part, threads) + "\n"
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    md = ("# Matmul GFLOP/s (median of interleaved repeats; noisy shared machine)\n\n"
          + "; ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n" + HOW + "\n" + md)
    print(md)
    if not a.no_write:
        write_results(RESULTS, "matmul", dict(meta=meta, rows=rows), md, sys.argv)


if __name__ == "__main__":
    main()
