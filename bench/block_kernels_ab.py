"""The block kernels of two revisions side by side: one token (M = 1) through one weight matrix per
qtype, both builds in one process, alternating, same bytes, same flags.

Why: `bench/block_kernels.py` runs one build, and on a shared 2-core guest its figures move by up to
2x between runs, more than a kernel change. Here the base revision's sources (``git show REV:...``) and
the working tree's are compiled with the same flags (quant/blocks_native.FLAGS) and timed in turns on
the same random valid rows (quant/block_samples.py), so the guest's drift hits both alike. The
builds' outputs are compared too: a change that keeps the arithmetic must give the same bits.

    PYTHONPATH=src .venv/bin/python bench/block_kernels_ab.py --base REV [--qtypes MXFP4,Q4_K] [--threads 1]

Writes bench/results/block_kernels_ab.{json,md}.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from moemesh.quant import blocks_native  # noqa: E402
from moemesh.quant.block_samples import random_rows  # noqa: E402
from moemesh.quant.native import load_library  # noqa: E402

RESULTS = ROOT / "bench" / "results"
QUANT = "src/moemesh/quant"


def build(rev: str | None, tmp: Path) -> ctypes.CDLL:
    """The block library of ``rev``'s sources (None: the working tree's)."""
    src = ROOT / QUANT
    if rev is not None:
        src = tmp / rev.replace("/", "_")
        src.mkdir(parents=True, exist_ok=True)
        for name in blocks_native.SOURCES:
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{QUANT}/{name}"], check=True,
                                  capture_output=True, text=True).stdout
            (src / name).write_text(text)
    lib = load_library(f"blocks_ab_{rev or 'tree'}".replace("/", "_").replace("~", "_"), src, blocks_native.SOURCES,
                       list(blocks_native.FLAGS))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bk_matmul.argtypes = [i32, p, i64, i64, p, i64, i64, p, p, i32]
    lib.bk_matmul.restype = i32
    return lib


def matrix(qtype: str, n: int, k: int) -> torch.Tensor:
    """uint8 [n, row_bytes]: random valid blocks (quant/block_samples.py, as the kernel tests use)."""
    return random_rows(qtype, n, k, seed=1).contiguous()


def time_calls(lib: ctypes.CDLL, tid: int, x: torch.Tensor, w: torch.Tensor, k: int, y: torch.Tensor,
               threads: int, seconds: float) -> float:
    """Seconds per call (median of timed batches of calls)."""
    n = w.shape[0]
    args = (tid, x.data_ptr(), 1, k, w.data_ptr(), w.stride(0), n, None, y.data_ptr(), threads)
    for _ in range(5):
        lib.bk_matmul(*args)
    per = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(per) < 5:
        t = time.perf_counter()
        for _ in range(20):
            lib.bk_matmul(*args)
        per.append((time.perf_counter() - t) / 20)
    return statistics.median(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision of the base build (the working tree is the other)")
    ap.add_argument("--qtypes", default="MXFP4,Q4_0,Q4_1,Q8_0,IQ4_XS,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2816, help="in_features (a multiple of 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per qtype")
    ap.add_argument("--seconds", type=float, default=0.3, help="timed per build and round")
    ap.add_argument("--out", default=str(RESULTS / "block_kernels_ab"))
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        base, tree = build(args.base, Path(tmp)), build(None, Path(tmp))
    rows = []
    g = torch.Generator().manual_seed(0)
    for qtype in args.qtypes.split(","):
        tid = blocks_native.TYPE_IDS[qtype]
        w = matrix(qtype, args.rows, args.k)
        x = torch.randn(1, args.k, generator=g)  # [1, K]
        ya, yb = torch.empty(1, args.rows), torch.empty(1, args.rows)
        ta, tb = [], []
        for r in range(args.rounds):  # alternate which build goes first
            for lib, acc, y in ((base, ta, ya), (tree, tb, yb)) if r % 2 == 0 else ((tree, tb, yb), (base, ta, ya)):
                acc.append(time_calls(lib, tid, x, w, args.k, y, args.threads, args.seconds))
        gb = w.numel() / 1e9
        row = {"qtype": qtype, "bytes": w.numel(), "base_gb_s": gb / statistics.median(ta),
               "tree_gb_s": gb / statistics.median(tb), "base_all": [gb / t for t in ta], "tree_all": [gb / t for t in tb],
               "same_bits": bool(torch.equal(ya, yb))}
        row["ratio"] = row["tree_gb_s"] / row["base_gb_s"]
        rows.append(row)
        print(f"{qtype:7s} base {row['base_gb_s']:6.2f} GB/s  tree {row['tree_gb_s']:6.2f} GB/s  "
              f"x{row['ratio']:.2f}  same bits: {row['same_bits']}", flush=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"command": " ".join(["bench/block_kernels_ab.py", *sys.argv[1:]]), "base": args.base, "tree_head": head,
           "rows": args.rows, "k": args.k, "threads": args.threads, "rounds": args.rounds,
           "loadavg": [load0, os.getloadavg()[0]], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = [f"# Block kernels, two builds side by side ({res['date']})", "",
             f"`PYTHONPATH=src .venv/bin/python {res['command']}`", "",
             f"Base: `{args.base}`; tree: the working tree at `{head}`. One token (M = 1) through one [{args.rows}, "
             f"{args.k}] matrix of random valid blocks ({args.threads} thread(s); in cache for most types), both "
             f"builds in one process, {args.rounds} alternating rounds, medians. Load average {load0:.1f} before, "
             f"{res['loadavg'][1]:.1f} after.", "",
             "| qtype | base GB/s | tree GB/s | tree / base | same bits |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['qtype']} | {r['base_gb_s']:.2f} | {r['tree_gb_s']:.2f} | **{r['ratio']:.2f}x** | {r['same_bits']} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
