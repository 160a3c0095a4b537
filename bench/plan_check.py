"""Check `moemesh plan`'s predicted tokens/s against measured decode runs, in one command.

1. probe the machine (`moemesh bench --quick`, scratch file on the disk that holds the model);
2. build (or reuse) the synthetic Qwen3-30B-A3B-shaped int4 store of benchkit/synth/core.py;
3. decode a fixed teacher-forced token stream with moemesh: no cap (every expert resident; its
   routers are hooked to record which experts the stream picks), then under cgroup-v1 memory caps
   of --caps percent of the expert bytes (page cache counted and dropped, --ram = cap - margin,
   lazy experts), rotating the order each repeat;
4. predict each configuration with `moemesh plan`'s code (commands/plan.plan) from the probe, the
   store and a hit rate: the recorded routing trace's timed steps replayed through the cache's
   own policy at the budget's slots (benchkit/cache_sim.py; the warm-up steps fill it), once with
   the shipped IO_FACTOR and once with IO_FACTOR refit on the --calibrate caps; report the
   errors. Writes bench/results/plan_check.{json,md}.

    .venv/bin/python bench/plan_check.py [--layers 12] [--caps 25,50,100] [--repeats 5] [--tokens 36]
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
import lazy_runs  # noqa: E402
from moemesh.benchkit import perfmodel  # noqa: E402
from moemesh.benchkit import probe as probe_mod
from moemesh.benchkit.results import write_results  # noqa: E402
from moemesh.benchkit.synth import core as synth
from moemesh.commands.plan import plan  # noqa: E402

MIB = 2**20


def measure(args, store: Path, expert_bytes: int, configs: list[str]) -> dict[str, list[dict]]:
    stream = lazy_runs.token_stream(args.warmup + args.tokens, args.vocab, args.seed)
    wargs = SimpleNamespace(load_headroom_mib=args.load_headroom_mib, omp_wait_policy=args.omp_wait_policy,
                            llama_python=None)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[: rep % len(configs)]
        for c in order:
            cap = None if c == "none" else int(expert_bytes * int(c[1:]) / 100)
            cfg = {"store": str(store), "tokens": stream, "warmup": args.warmup, "threads": args.threads,
                   "io_threads": args.io_threads, "policy": "lfu", "prefetch": True,
                   "ram": None if cap is None else cap - args.margin_mib * MIB,
                   "routing": c == "none"}  # resident model only: the lazy lookahead calls routers too
            r = lazy_runs.run_worker("moemesh", cfg, cap, args.timeout, wargs, cap_after_load=True)
            r["config"], r["repeat"] = c, rep
            runs[c].append(r)
            msg = r.get("error") or f"{r['tokens_per_s']:.2f} tok/s"
            print(f"[{c} rep {rep}] moemesh: {msg} (process {r['process_wall_s']:.0f} s)", flush=True)
    return runs


def refit_io_factor(rows: dict[str, dict], calibrate: str) -> float | None:
    """The IO_FACTOR k that best fits t = cpu + k * disk on the calibration caps: least squares of
    the relative error (cpu + k d) / t - 1 over them, i.e. k = sum(d/t (1 - cpu/t)) / sum((d/t)^2)."""
    names = [c for c in rows if c != "none"] if calibrate == "all" else [f"q{int(calibrate)}"]
    num = den = 0.0
    for c in names:
        row = rows.get(c)
        if not row or not row["measured_tokens_per_s"] or not row["plan"]["disk_floor_s"]:
            continue
        p, t = row["plan"], 1 / row["measured_tokens_per_s"]
        cpu = max(p["memory_floor_s"], p["compute_floor_s"]) + p.get("overhead_s", 0.0)
        num += p["disk_floor_s"] / t * (1 - cpu / t)
        den += (p["disk_floor_s"] / t) ** 2
    return num / den if den else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--caps", default="25,50,100", help="memory caps, percent of the expert bytes")
    ap.add_argument("--calibrate", default="all", help="the cap IO_FACTOR is refit on (a percent), or all caps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=12, help="untimed steps first: the cache fills (cold misses)")
    ap.add_argument("--tokens", type=int, default=36)
    ap.add_argument("--margin-mib", type=int, default=128)
    ap.add_argument("--load-headroom-mib", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of the probe and the decode runs ('' = the default: spinning threads, "
                         "which collapse on an oversubscribed 2-core machine)")
    ap.add_argument("--probe", help="reuse this probe JSON instead of probing")
    ap.add_argument("--out", default=str(HERE / "results" / "plan_check"))
    args = ap.parse_args()
    if not cgroup.available():
        sys.exit("bench/plan_check.py needs root and the cgroup-v1 memory controller (memory caps)")
    t_start, load_before = time.time(), os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    root = synth.build(Path(args.work_dir), args.layers, args.vocab, args.seed, log=lambda m: print(m, flush=True))
    store = root / "store"
    from moemesh.store.expert_store import ExpertStore

    st = ExpertStore(store)
    expert_bytes = st.expert_bytes()
    probe_path = Path(args.probe) if args.probe else out.with_name(out.name + "_probe.json")
    if not args.probe:
        # the probe runs under the decode runs' OpenMP wait policy: with PASSIVE every parallel region
        # wakes sleeping threads, which is part of the per-layer overhead the probe measures
        env = {**os.environ, **({"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {})}
        subprocess.run([sys.executable, "-m", "moemesh.cli", "bench", "--quick", "--out", str(probe_path),
                        "--disk-dir", str(args.work_dir), "--threads", str(args.threads)], check=True, env=env)
    probe = probe_mod.load(probe_path)
    if probe is None:
        sys.exit(f"{probe_path}: no usable probe")

    caps = [f"q{int(c)}" for c in args.caps.split(",") if c.strip()]
    configs = ["none", *caps]
    runs = measure(args, store, expert_bytes, configs)
    ok_none = [r for r in runs["none"] if "routing_trace" in r]
    if not ok_none:
        sys.exit("the uncapped run failed: no routing trace")
    routing, trace = ok_none[0]["routing_counts"], ok_none[0]["routing_trace"]

    rows = {}
    for c in configs:
        cap = None if c == "none" else int(expert_bytes * int(c[1:]) / 100)
        ram = 2**40 if cap is None else cap - args.margin_mib * MIB  # none: everything resident
        # the hit rate of the cache's own policy replaying the recorded stream's timed steps
        warm = args.warmup * len(st.moe_layers)
        p = plan(str(store), ram, 1, probe, trace=trace, trace_warmup=warm)["formats"]["int4"]
        p["profile_hit_rate"] = plan(str(store), ram, 1, probe, routing=routing)["formats"]["int4"]["hit_rate"]
        uni = plan(str(store), ram, 1, probe)["formats"]["int4"]
        ok = [r for r in runs[c] if "error" not in r]
        tps = [r["tokens_per_s"] for r in ok]
        rows[c] = {
            "cap_bytes": cap, "ram_bytes": None if cap is None else ram, "runs": len(runs[c]), "ok": len(ok),
            "errors": [r["error"] for r in runs[c] if "error" in r],
            "measured_tokens_per_s": statistics.median(tps) if tps else None, "measured_all": tps,
            "measured_true_hit_rate": statistics.median([r["resident_hit_rate"] for r in ok]) if ok and "resident_hit_rate" in ok[0] else None,
            "measured_slots": ok[0].get("slots") if ok else None,
            "measured_trunk_bytes": (ok[0].get("budget") or {}).get("trunk") if ok else None,
            "measured_bytes_read_per_token": statistics.median([r["bytes_read_per_token"] for r in ok]) if ok and "bytes_read_per_token" in ok[0] else None,
            "plan": p, "plan_uniform_tokens_per_s": uni.get("tokens_per_s"),
        }
    k_fit = refit_io_factor(rows, args.calibrate)
    none_tps = rows["none"]["measured_tokens_per_s"]
    for c, row in rows.items():
        p, m = row["plan"], row["measured_tokens_per_s"]
        row["error_shipped"] = None if not (m and p["tokens_per_s"]) else p["tokens_per_s"] / m - 1
        if none_tps and m:  # diagnostic: the I/O model alone, cpu term taken from the uncapped run
            t = 1 / none_tps + perfmodel.IO_FACTOR * p["disk_floor_s"]
            row["predicted_measured_cpu_tokens_per_s"] = 1 / t
            row["error_measured_cpu"] = 1 / t / m - 1
        if k_fit is not None and m:
            t = max(p["memory_floor_s"], p["compute_floor_s"]) + p.get("overhead_s", 0.0) + k_fit * p["disk_floor_s"]
            row["predicted_refit_tokens_per_s"] = 1 / t
            row["error_refit"] = 1 / t / m - 1
    result = {
        "bench": "plan_check", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "bench/plan_check.py " + shlex.join(sys.argv[1:]),
        "machine": {"cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "model": {"layers": args.layers, "vocab": args.vocab, "store": str(store), "expert_bytes": expert_bytes,
                  "blob_bytes": st.blob_size},
        "probe": probe, "io_factor_shipped": perfmodel.IO_FACTOR, "io_factor_refit": k_fit,
        "calibration_cap": "all caps" if args.calibrate == "all" else f"q{args.calibrate}",
        "routing_counts": routing, "routing_trace": trace, "rows": rows, "runs": runs,
        "settings": vars(args), "wall_s": time.time() - t_start,
    }
    for rr in runs.values():
        for r in rr:
            r.pop("routing_counts", None)
            r.pop("routing_trace", None)
            r.pop("step_s", None)
    write_results(out.parent, out.name, result, markdown(result), sys.argv)
    print(markdown(result))


def _f(x, fmt="{:.2f}", scale=1.0):
    return "-" if x is None else fmt.format(x * scale)


def markdown(r: dict) -> str:
    pr, m = r["probe"], r["model"]
    disk = max(d["bytes_s"] for d in pr["disk"]["measurements"])
    lines = [
        "# `moemesh plan` vs measured decode (Qwen3-30B-A3B-shaped synthetic store)", "",
        f"Model: {m['layers']} layers of Qwen3-30B-A3B's shapes, vocab {m['vocab']}, int4 experts "
        f"({m['blob_bytes'] / MIB:.2f} MiB each, {m['expert_bytes'] / 2**30:.2f} GiB). Teacher-forced pseudo-random "
        "token stream; fresh process per run; configurations rotate each repeat.", "",
        f"Probe (`moemesh bench --quick`): disk best {disk / 1e9:.2f} GB/s (the model's: median near one blob "
        f"{perfmodel.disk_bandwidth(pr, m['blob_bytes']) / 1e9:.2f}), memory {pr['memory']['bytes_s'] / 1e9:.1f} GB/s, "
        f"int4 M=1 matmul {pr['matmul']['int4']['gflops']:.1f} GFLOP/s ({pr['threads']} threads). Machine: "
        f"{r['machine']['cores']} cores shared with other jobs (load {r['machine']['loadavg_before'][0]:.1f} before, "
        f"{r['machine']['loadavg_after'][0]:.1f} after): **timings are noisy**.", "",
        "Prediction = `max(memory, compute floor) + layers * eager overhead per layer (probe) + IO_FACTOR * disk floor`, disk floor = "
        "`L * k * (1 - h) * blob / disk BW`, h = the hit rate of the cache's own policy (LFU, the budget's slots) "
        "replaying the routing trace recorded in the uncapped run (`benchkit/cache_sim.py`; warm-up steps fill the cache, "
        "timed steps are counted); 'profile' is `moemesh plan --routing`'s estimate from the same run's counts. "
        f"Shipped IO_FACTOR {r['io_factor_shipped']}; refit on {r['calibration_cap']} (least squares of the relative "
        f"error): {_f(r['io_factor_refit'])}.", "",
        "| config | --ram MiB | measured tok/s (median; all) | plan tok/s | error | refit tok/s | error (refit) | "
        "uniform-routing plan tok/s | I/O model alone: tok/s, error | hit rate replay / measured (profile) | slots plan / measured | "
        "trunk MiB plan / measured |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for c, row in r["rows"].items():
        p = row["plan"]
        allv = ", ".join(f"{x:.2f}" for x in row["measured_all"])
        lines.append(
            f"| {c} | {_f(row['ram_bytes'], '{:.0f}', 1 / MIB)} | **{_f(row['measured_tokens_per_s'])}** ({allv}) | "
            f"{_f(p['tokens_per_s'])} | {_f(row['error_shipped'], '{:+.0%}')} | {_f(row.get('predicted_refit_tokens_per_s'))} | "
            f"{_f(row.get('error_refit'), '{:+.0%}')} | {_f(row['plan_uniform_tokens_per_s'])} | "
            f"{_f(row.get('predicted_measured_cpu_tokens_per_s'))}, {_f(row.get('error_measured_cpu'), '{:+.0%}')} | "
            f"{_f(p['hit_rate'])} / {_f(row['measured_true_hit_rate'])} ({_f(p.get('profile_hit_rate'))}) | {p['cache_slots']} / {row['measured_slots'] or '-'} | "
            f"{_f(p['trunk_ram_bytes'], '{:.0f}', 1 / MIB)} / {_f(row['measured_trunk_bytes'], '{:.0f}', 1 / MIB)} |")
    lines += ["", "Notes:",
              "- none: no cap, every expert resident (the prediction is the memory/compute floor alone).",
              "- qNN: cgroup-v1 limit of NN% of the expert bytes (page cache counted, dropped before each run), "
              f"moemesh --ram = cap - {r['settings']['margin_mib']} MiB, lazy experts (LFU, prefetch, O_DIRECT, xxh3-64 blob checksums).",
              f"- OMP_WAIT_POLICY={r['settings'].get('omp_wait_policy', 'PASSIVE') or '(default)'} for the probe and every decode run.",
              "- 'I/O model alone' replaces the probe's compute/memory term by the measured uncapped time per token "
              "(a diagnostic: it separates the disk/hit-rate model from the compute rate, which load swings most).",
              "- measured hit rate excludes prefetched experts; 'uniform-routing plan' is what `moemesh plan` prints "
              "without a routing profile (random router weights route far from uniformly, so it is pessimistic here).",
              f"- {r['settings']['warmup']} untimed warm-up steps, {r['settings']['tokens']} timed steps, medians over "
              f"{r['settings']['repeats']} repeats.", "", "Command:", "", "```", f".venv/bin/python {r['command']}", "```", "",
              f"Total wall time {r['wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
