"""torch's int4 CPU kernel vs moemesh's C kernel (layers/int4_matmul.c) on MoE expert shapes.

Weights out of cache: each timed pass cycles over ``--mats`` different weight matrices (64 x
1.9 MiB for gate_up), as decode does over experts. Methods alternate per pass, so bursts of load
from other processes hit both. Also reports accuracy vs the fp32 dequantized weight and the
prefill-sized M rate. Writes bench/results/int4_kernel.{json,md}.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/int4_kernel.py [--threads 2] [--ms 1,2,4,8,64,256]

``--bandwidth [--quick] [--isas avx2,scalar]`` instead measures GB/s of the fused experts call and the
M=1 matmul on Qwen3-30B-A3B shapes against a plain read of the same bytes (the floor) and torch's
kernel (bench/int4_bandwidth.py), writing bench/results/int4_kernel_bw[_quick].{json,md}.

``--decode STORE`` instead loads the bench/lazy.py synthetic model (all experts resident) once and
times decode steps (and a prefill) in alternating blocks with the C kernel on and off
(MOEMESH_INT4_NATIVE, read per call), writing bench/results/int4_kernel_decode.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from moemesh.quant import int4_native as n4
from moemesh.quant.qlinear import QuantLinear

SHAPES = [("gate_up", 2048, 1536), ("down", 768, 2048)]  # (name, K in, N out): Qwen3-30B-A3B experts
RESULTS = Path(__file__).parent / "results"


def random_mats(k: int, n: int, count: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """count (qweight uint8 [N, K/2], sz bf16 [K/32, N, 2]) pairs; any bytes are a valid packing."""
    out = []
    for _ in range(count):
        qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        s = torch.rand(k // 32, n, generator=gen) * 0.02 + 0.01
        z = torch.randn(k // 32, n, generator=gen) * 0.01
        out.append((qw, torch.stack([s, z], -1).to(torch.bfloat16).contiguous()))
    return out


def time_pass(fn, mats, x) -> float:
    """Seconds per call over one pass through all matrices."""
    t0 = time.perf_counter()
    for qw, sz in mats:
        fn(x, qw, sz)
    return (time.perf_counter() - t0) / len(mats)


def accuracy(k: int, n: int, lib, ms: list[int]) -> dict:
    """Relative error ||y - ref|| / ||ref|| and max |y - ref| / max |ref| vs x @ W_dequant.T (fp32)."""
    g = torch.Generator().manual_seed(k + n)
    layer = QuantLinear.from_float(torch.randn(n, k, generator=g), None, "int4", 32)
    w = layer.dequantized_weight()  # [N, K] fp32
    res = {}
    for m in ms:
        x = torch.randn(m, k, generator=g)
        ref = x @ w.t()
        ys = {"torch": torch._weight_int4pack_mm_for_cpu(x.bfloat16(), layer.qweight, 32, layer.scales_and_zeros).float(),
              "native": n4.int4_matmul(lib, x, layer.qweight, layer.scales_and_zeros)}
        res[m] = {name: {"rel_l2": ((y[:, :n] - ref).norm() / ref.norm()).item(),
                         "max_rel": ((y[:, :n] - ref).abs().max() / ref.abs().max()).item()} for name, y in ys.items()}
    return res


def decode_ab(store: str, threads: int, blocks: int, steps: int, prefill: int) -> None:
    """Interleaved A/B of whole decode steps in one process: the same model, cache and token stream,
    kernel switched per block, so load from other processes hits both arms alike."""
    import random

    from moemesh.batch import BatchLayout
    from moemesh.loading.loader import load_model

    torch.set_num_threads(threads)
    model = load_model(store, "int4").model
    rng = random.Random(1000)
    tokens = [rng.randrange(3, 32768) for _ in range(blocks * 2 * steps + 3 + prefill)]
    arms = {"torch": "0", "native": "1"}
    per = {a: [] for a in arms}
    pre = {a: [] for a in arms}
    load0, t_start = os.getloadavg(), time.time()
    with torch.inference_mode():
        for rep in range(2):  # prefill of `prefill` tokens as one batch, per arm (fresh cache each)
            for arm, flag in arms.items():
                os.environ["MOEMESH_INT4_NATIVE"] = flag
                cache = model.new_cache()
                cache.add_sequence(0)
                t = time.perf_counter()
                model(torch.tensor(tokens[:prefill]), torch.arange(prefill), cache, BatchLayout([0], [prefill]))
                pre[arm].append(time.perf_counter() - t)
        cache = model.new_cache()
        cache.add_sequence(0)
        pos = 0
        for b in range(blocks + 1):  # block 0 is warm-up
            for arm, flag in (arms.items() if b % 2 else reversed(arms.items())):
                os.environ["MOEMESH_INT4_NATIVE"] = flag
                for _ in range(steps):
                    t = time.perf_counter()
                    model(torch.tensor([tokens[pos]]), torch.tensor([pos]), cache, BatchLayout([0], [1]))
                    if b:
                        per[arm].append(time.perf_counter() - t)
                    pos += 1
    res = {"store": store, "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
           "loadavg_before": load0, "loadavg_after": os.getloadavg(), "wall_s": round(time.time() - t_start, 1),
           "step_s": per, "prefill_s": pre, "prefill_tokens": prefill,
           "tok_s_median": {a: 1 / statistics.median(v) for a, v in per.items()},
           "tok_s_mean": {a: len(v) / sum(v) for a, v in per.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int4_kernel_decode.json").write_text(json.dumps(res, indent=1))
    md = ["# Decode with torch's int4 kernel vs the C kernel (synthetic Qwen3-30B-A3B shapes, all experts resident)", "",
          f"Store {store}; {threads} threads; OMP_WAIT_POLICY={res['omp_wait_policy'] or 'unset'}; {blocks} blocks of "
          f"{steps} one-token steps per arm, arms alternating in one process (same model and KV cache); "
          f"loadavg before {load0[0]:.1f}, after {res['loadavg_after'][0]:.1f} (shared 2-core machine: noisy).", "",
          "| kernel | decode tok/s (median step) | decode tok/s (mean) | prefill s for "
          f"{prefill} tokens (each run) |", "|---|---:|---:|---|"]
    for a in arms:
        md.append(f"| {a} | {res['tok_s_median'][a]:.2f} | {res['tok_s_mean'][a]:.2f} | "
                  + ", ".join(f"{v:.2f}" for v in pre[a]) + " |")
    (RESULTS / "int4_kernel_decode.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def bandwidth_main(threads: int, quick: bool, isas: list[str]) -> None:
    from int4_bandwidth import bandwidth, markdown  # bench/ is the script's directory

    res = bandwidth(threads, quick, isas)
    stem = "int4_kernel_bw_quick" if quick else "int4_kernel_bw"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ms", default="1,2,4,8,64,256")
    ap.add_argument("--mats", type=int, default=64)
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--decode", metavar="STORE", help="A/B decode on this store instead of the kernel table")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--bandwidth", action="store_true", help="GB/s vs the read floor and torch (int4_bandwidth.py)")
    ap.add_argument("--quick", action="store_true", help="with --bandwidth: a small pool, 5 rounds (~1 min)")
    ap.add_argument("--isas", default="", help="with --bandwidth: kernel builds to time (default: this CPU's best)")
    args = ap.parse_args()
    if args.bandwidth:
        return bandwidth_main(args.threads, args.quick, [v for v in args.isas.split(",") if v] or n4.cpu_isas()[:1])
    if args.decode:
        return decode_ab(args.decode, args.threads, args.blocks, args.steps, args.prefill)
    torch.set_num_threads(args.threads)
    lib = n4.load_native()
    if lib is None:
        raise SystemExit("native int4 kernel unavailable (no C compiler, or MOEMESH_INT4_NATIVE=0)")
    ms = [int(v) for v in args.ms.split(",")]
    methods = {
        "torch": lambda x, qw, sz: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), qw, 32, sz),
        "native": lambda x, qw, sz: n4.int4_matmul(lib, x, qw, sz),
    }
    load0, t_start = os.getloadavg(), time.time()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, k, n in SHAPES:
        mats = random_mats(k, n, args.mats, gen)
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            passes = args.passes if m <= 8 else max(2, args.passes // 3)
            mm = mats if m <= 8 else mats[:8]  # large M is compute bound; fewer matrices
            samples = {meth: [] for meth in methods}
            for meth, fn in methods.items():
                fn(x, *mm[0])  # warm-up
            for _ in range(passes):
                for meth, fn in methods.items():
                    samples[meth].append(time_pass(fn, mm, x))
            med = {meth: statistics.median(v) for meth, v in samples.items()}
            row = {"shape": name, "k": k, "n": n, "m": m,
                   **{f"{meth}_us": med[meth] * 1e6 for meth in methods},
                   **{f"{meth}_best_us": min(samples[meth]) * 1e6 for meth in methods},
                   "speedup": med["torch"] / med["native"]}
            rows.append(row)
            print(f"{name:8s} M={m:4d}  torch {row['torch_us']:9.1f} us  native {row['native_us']:9.1f} us  "
                  f"x{row['speedup']:.2f}", flush=True)
    acc = {name: accuracy(k, n, lib, [1, 8]) for name, k, n in SHAPES}
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "mats": args.mats, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "loadavg_before": load0, "loadavg_after": os.getloadavg(), "wall_s": round(time.time() - t_start, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int4_kernel.json").write_text(json.dumps({"meta": meta, "rows": rows, "accuracy": acc}, indent=1))
    md = ["# int4 matmul: torch `_weight_int4pack_mm_for_cpu` vs moemesh C kernel (int4_matmul.c)", "",
          f"torch {meta['torch']}; {meta['threads']} threads; OMP_WAIT_POLICY={meta['omp_wait_policy'] or 'unset'}; "
          f"weights cycled over {args.mats} matrices per pass (8 for M > 8); median of passes, methods alternating; "
          f"loadavg before {load0[0]:.1f}, after {meta['loadavg_after'][0]:.1f}: shared noisy machine.", "",
          "| shape (K->N) | M | torch us/call | native us/call | speedup | torch best | native best |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['shape']} ({r['k']}->{r['n']}) | {r['m']} | {r['torch_us']:.1f} | {r['native_us']:.1f} | "
                  f"{r['speedup']:.2f} | {r['torch_best_us']:.1f} | {r['native_best_us']:.1f} |")
    md += ["", "Accuracy vs x @ W_dequant.T in fp32 (same int4 weights; rel_l2 = ||y-ref||/||ref||, "
           "max_rel = max|y-ref| / max|ref|):", "", "| shape | M | torch rel_l2 | native rel_l2 | torch max_rel | native max_rel |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, per_m in acc.items():
        for m, d in per_m.items():
            md.append(f"| {name} | {m} | {d['torch']['rel_l2']:.2e} | {d['native']['rel_l2']:.2e} | "
                      f"{d['torch']['max_rel']:.2e} | {d['native']['max_rel']:.2e} |")
    (RESULTS / "int4_kernel.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
