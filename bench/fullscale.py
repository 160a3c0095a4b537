"""The promise at full scale: a whole gpt-oss-120b (MXFP4, 62.8 GB) and a whole Qwen3-30B-A3B (Q4_K,
17.2 GB), random valid weights at their real shapes (benchkit/synth/whole.py), moemesh vs llama.cpp on the
SAME GGUF under cgroup-v1 memory caps (page cache counted, dropped before every run), fresh processes,
engines alternating, medians.

Per model: the file is generated once (resumable) under $MOEMESH_BENCH_DATA or ~/.cache/moemesh/bench-data;
exactness on its first 2 layers (lazy == resident, layer-major == chunked prefill, bit for bit); the disk
floor (median O_DIRECT random-read bandwidth at one expert slice per request and the engine's queue
depth = --io-threads); then per cap: decode tok/s, bytes read per token, hit rate, peak RSS for moemesh
with uniform routing (the random router: the worst case) and with the calibrated trace (labelled), and
llama.cpp (mmap, no repacking: its own routing, uniform); then time to first token for long prompts under
the first cap (moemesh layer-major prefill vs llama.cpp's 512-token batches); `moemesh plan`'s prediction
per cap beside the measurement. llama.cpp runs are capped by --llama-timeout and a timeout is reported
as such. Writes bench/results/fullscale.{json,md,png}.

    flock /work/bench.lock .venv/bin/python bench/fullscale.py [--models gpt-oss-120b,qwen3-30b-a3b] [--cleanup]
    .venv/bin/python bench/fullscale.py --quick     # tiny shapes, same code path: ~3-5 min
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
import fullscale_runs as fr  # noqa: E402
from fullscale_report import markdown, plot  # noqa: E402
from lazy_runs import summarize, token_stream  # noqa: E402

RESULTS = HERE / "results"
GIB = 2**30
CAPS = {"gpt-oss-120b": "8G,16G", "qwen3-30b-a3b": "8G,none"}  # the configurations


def parse_cap(c: str) -> int | None:
    return None if c == "none" else int(float(c.rstrip("G")) * GIB)


def decode_runs(path: Path, spec, cap: int | None, args, stream: list[int]) -> dict:
    """Alternating repeats of moemesh (uniform, calibrated) and llama.cpp under one cap."""
    arms = [("moemesh", r) for r in args.routings] + ([("llama.cpp", "router")] if args.llama else [])
    runs: dict[str, list] = {f"{e} {r}": [] for e, r in arms}
    for rep in range(args.repeats if arms else 0):  # (no arms: a TTFT-only run)
        for engine, routing in arms[rep % len(arms):] + arms[: rep % len(arms)]:
            key = f"{engine} {routing}"
            if engine == "llama.cpp":
                if rep >= args.llama_repeats:
                    continue
                cfg = {"model": str(path), "tokens": stream[: args.warmup + args.llama_tokens], "warmup": args.warmup,
                       "threads": args.threads, "repack": False}
                r = fr.run("llama.cpp", cfg, cap, args.llama_timeout, args)
            else:
                cfg = {"mode": "decode", "store": str(path), "quant": "auto", "tokens": stream, "warmup": args.warmup,
                       "threads": args.threads, "io_threads": args.io_threads, "policy": args.policy, "prefetch": True,
                       "ram": None if cap is None else cap - args.margin_mib * 2**20,
                       "trace": {"router": None, "uniform": "uniform"}.get(routing, spec.name.removesuffix("-tiny")),
                       "trace_shape": [spec.layers, spec.experts, spec.top_k], "quick": args.quick}
                r = fr.run("moemesh", cfg, cap, args.timeout, args)
            r.pop("step_s", None)
            runs[key].append(r)
            msg = r.get("error") or f"{r['tokens_per_s']:.3f} tok/s"
            if "hit_rate" in r:
                msg += f", hit {r['hit_rate']:.2f}, {r['bytes_read_per_token'] / 2**20:.0f} MiB/token"
            elif r.get("disk_read_bytes_per_token") is not None:
                msg += f", disk {r['disk_read_bytes_per_token'] / 2**20:.0f} MiB/token"
            print(f"  [{spec.name} cap {cap and cap / GIB}G rep {rep}] {key}: {msg} "
                  f"(process {r['process_wall_s']:.0f} s)", flush=True)
    return {k: {"summary": summarize(v), "runs": v} for k, v in runs.items()}


def prefill_runs(path: Path, spec, cap: int | None, args) -> dict:
    out = {}
    for n in args.prompts:
        prompt = token_stream(n, spec.vocab, 7)
        for engine in ["moemesh"] + (["llama.cpp"] if args.llama else []):
            if engine == "moemesh":
                cfg = {"mode": "prefill", "store": str(path), "tokens": prompt, "threads": args.threads,
                       "io_threads": args.io_threads, "policy": args.policy, "prefetch": True, "chunk": 512,
                       "ram": None if cap is None else cap - args.margin_mib * 2**20}
                r = fr.run("moemesh", cfg, cap, args.prefill_timeout, args)
            else:
                cfg = {"model": str(path), "tokens": prompt, "prefill": True, "threads": args.threads, "repack": False}
                r = fr.run("llama.cpp", cfg, cap, args.llama_prefill_timeout, args)
            out[f"{engine} {n}"] = r
            got = r.get("error") or f"{r['ttft_s']:.1f} s"
            print(f"  [{spec.name} TTFT {n} tokens] {engine}: {got}", flush=True)
    return out


def prefill_floor(spec, n: int, disk_bps: float, rate: dict | None, touched_bytes: float) -> dict:
    """(bytes of the experts the prompt touches / disk bandwidth) + the experts' compute at the measured rate."""
    flops = 2 * 3 * n * spec.layers * spec.top_k * spec.hidden * spec.inter
    compute = flops / (rate["gflops"] * 1e9) if rate else None
    io = touched_bytes / disk_bps
    return {"io_s": io, "compute_s": compute, "floor_s": io + (compute or 0.0), "expert_flops": flops}


def floor_rates(spec, prompts: list[int]) -> dict:
    """The rates a prompt's attention and attention projections run at here (fullscale_report.prefill_floors)."""
    qkvo = [(spec.hidden, spec.heads * spec.head_dim), (spec.hidden, spec.kv_heads * spec.head_dim),
            (spec.hidden, spec.kv_heads * spec.head_dim), (spec.heads * spec.head_dim, spec.hidden)]
    return {"attention_rate": fr.attention_rate(spec.heads, spec.kv_heads, spec.head_dim, max(prompts) // 2,
                                                sinks=spec.gpt_oss),
            "trunk_rate": fr.block_rate(spec.attn_type, qkvo, 512)}


def one_model(name: str, args, log) -> dict:
    from moemesh.benchkit.synth import whole, whole_write

    spec = whole.tiny_spec(name) if args.quick else whole.SPECS[name]
    t0 = time.time()
    path = whole_write.write(spec, args.dir, progress=not args.no_progress)
    res = {"spec": spec.as_dict(), "file": str(path), "file_bytes": path.stat().st_size,
           "expert_bytes": whole.expert_bytes(spec), "ready_s": time.time() - t0}
    log(f"{name}: {path} ({res['file_bytes'] / 1e9:.1f} GB) ready in {res['ready_s']:.0f} s")
    res["exactness"] = (fr.exactness(path, 2, args.exact_tokens, 16, args.timeout) if args.exact_tokens
                        else {"error": "skipped (--exact-tokens 0)"})
    log(f"{name}: first 2 layers: {json.dumps(res['exactness'])}")
    slice_bytes = -(-fr.expert_slice_bytes(path) // 4096) * 4096  # O_DIRECT reads: whole 4 KiB pages
    res["disk"] = fr.disk_floor(path, slice_bytes, args.io_threads, args.disk_rounds, 1.0 if args.quick else 3.0)
    bps = res["disk"]["bytes_s"]
    log(f"{name}: disk floor bandwidth {bps / 1e9:.2f} GB/s ({slice_bytes / 2**20:.2f} MiB reads, QD{args.io_threads})")
    stream = token_stream(args.warmup + args.tokens, spec.vocab, args.seed)
    probe = args.probe_data
    res["caps"] = {}
    caps = [c.strip() for c in (args.caps or CAPS[name]).split(",") if c.strip()]
    for c in caps:
        cap = parse_cap(c)
        avail = mem_available()
        if cap is None and res["file_bytes"] * 1.1 > avail:  # a shared machine: never risk the global OOM killer
            why = (f"not run: no cap needs ~{res['file_bytes'] * 1.1 / GIB:.1f} GiB resident but only {avail / GIB:.1f} GiB "
                   "are available on this machine now")
            log(f"{name}: cap {c}: {why}")
            res["caps"][c] = {"cap_bytes": None, "skipped": why, "arms": {}}
            continue
        log(f"{name}: cap {c}")
        row = {"cap_bytes": cap, "arms": decode_runs(path, spec, cap, args, stream)}
        row["plan"] = fr.plan_row(path, None if cap is None else cap - args.margin_mib * 2**20, probe, spec.expert_type)
        res["caps"][c] = row  # (each arm's disk floor: fullscale_report.floor, from res["disk"])
    if args.prompts and caps:
        c = next((c for c in caps if c != "none"), caps[0])
        cap = parse_cap(c)
        log(f"{name}: time to first token under cap {c}")
        pre = prefill_runs(path, spec, cap, args)
        rate = fr.compute_rate(spec.expert_type, spec.hidden, spec.inter, max(1, args.prompts[0] * spec.top_k // spec.experts))
        per_expert = res["expert_bytes"] / (spec.layers * spec.experts)
        floors = {}
        for n in args.prompts:
            used = spec.experts * (1 - (1 - spec.top_k / spec.experts) ** n)  # expected experts touched per layer
            floors[n] = prefill_floor(spec, n, bps, rate, used * spec.layers * per_expert)
        res["prefill"] = {"cap": c, "runs": pre, "compute_rate": rate, "floors": floors, **floor_rates(spec, args.prompts)}
    if args.cleanup:
        whole_write.remove(spec, args.dir)
        log(f"{name}: removed {path.parent} (--cleanup)")
    return res


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup: kill the worker, remove its cgroup
    from moemesh.benchkit.suites import DEFAULT_LLAMA_PYTHON

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt-oss-120b,qwen3-30b-a3b")
    ap.add_argument("--caps", help="comma list of NG / none (default: gpt-oss 8G,16G; qwen3 8G,none); G = GiB")
    ap.add_argument("--routings", default="router,uniform,calibrated",
                    help="moemesh arms: router (the random model's own router, as llama.cpp runs it), uniform (a uniform "
                         "trace replayed: the worst case), calibrated (a trace fitted to the real model)")
    ap.add_argument("--no-llama", action="store_true", help="moemesh arms only")
    ap.add_argument("--merge-into", help="add this run's arms to an earlier results JSON (same models and caps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8, help="timed moemesh decode steps")
    ap.add_argument("--llama-tokens", type=int, default=3, help="timed llama.cpp decode steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", default="2048,8192", help="TTFT prompt lengths ('' = none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--policy", default="lfu")
    ap.add_argument("--margin-mib", type=int, default=256, help="moemesh --ram = cap - margin")
    ap.add_argument("--load-headroom-mib", type=int, default=0, help="0: the cap holds from the first byte")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--llama-timeout", type=float, default=420)
    ap.add_argument("--prefill-timeout", type=float, default=1200)
    ap.add_argument("--llama-prefill-timeout", type=float, default=900)
    ap.add_argument("--disk-rounds", type=int, default=5)
    ap.add_argument("--exact-tokens", type=int, default=48, help="prompt of the first-2-layer exactness check (0: skip)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE")
    ap.add_argument("--llama-python", default=os.environ.get("MOEMESH_LLAMA_PYTHON") or DEFAULT_LLAMA_PYTHON)
    ap.add_argument("--probe", help="machine probe for plan (default: the user's probe; re-run when foreign or stale)")
    ap.add_argument("--dir", type=Path, help="data dir (default $MOEMESH_BENCH_DATA or ~/.cache/moemesh/bench-data)")
    ap.add_argument("--cleanup", action="store_true", help="delete each model's file after its runs (default: keep)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (4 layers, 8 experts), caps 1G,none, 1 repeat")
    ap.add_argument("--out", default=str(RESULTS / "fullscale"))
    ap.add_argument("--rates-into", metavar="JSON", help="only measure the attention and projection rates of the "
                    "prefill floor and add them to an earlier run's results (re-rendering its markdown)")
    args = ap.parse_args()
    if args.rates_into:
        return rates_into(Path(args.rates_into))
    if args.quick:
        args.caps = args.caps or "1G,none"
        args.repeats, args.llama_repeats, args.tokens, args.llama_tokens, args.disk_rounds = 1, 1, 4, 2, 2
        args.prompts = "64,256" if args.prompts == "2048,8192" else args.prompts
        args.out = args.out + "_quick" if args.out == str(RESULTS / "fullscale") else args.out
    args.prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
    args.routings = [r.strip() for r in args.routings.split(",") if r.strip()]
    args.llama = Path(args.llama_python).is_file() and not args.no_llama
    if not cgroup.available():
        sys.exit("bench/fullscale.py needs root and the cgroup-v1 memory controller (memory caps)")
    log = lambda m: print(m, flush=True)  # noqa: E731
    from moemesh.benchkit.probe_check import probe_for

    args.probe_data, probe_note = probe_for(Path(args.probe) if args.probe else None, log=log)
    t_start, load_before = time.time(), os.getloadavg()
    result = {"bench": "fullscale", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "bench/fullscale.py " + shlex.join(sys.argv[1:]), "quick": args.quick,
              "machine": machine(), "loadavg_before": load_before, "probe": probe_note,
              "settings": {k: v for k, v in vars(args).items() if k != "probe_data"}, "models": {},
              "notes": ([] if args.llama else [f"llama.cpp skipped: no {args.llama_python}"])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        result["models"][name] = one_model(name, args, log)
        result["loadavg_after"], result["wall_s"] = os.getloadavg(), time.time() - t_start
        save(merged(result, args.merge_into) if args.merge_into else result, out)  # a partial run keeps what it measured
    print(out.with_suffix(".md").read_text())


def rates_into(path: Path) -> None:
    """floor_rates for each model of an earlier run with a prefill table (runs written before the floor counted
    attention), measured now on this machine and noted as such."""
    from moemesh.benchkit.synth import whole

    result = json.loads(path.read_text())
    for name, m in result["models"].items():
        if m.get("prefill"):
            spec = whole.WholeSpec(**m["spec"])
            m["prefill"].update(floor_rates(spec, [int(n) for n in m["prefill"]["floors"]]))
            result.setdefault("notes", []).append(
                f"{name}: the prefill floor's attention and projection rates were measured after the run "
                f"({time.strftime('%Y-%m-%d %H:%M')}, `bench/fullscale.py --rates-into {path.name}`), load average "
                f"{os.getloadavg()[0]:.1f}")
    save(result, path.with_suffix(""))


def machine() -> dict:
    from moemesh.benchkit.machine_id import machine_identity

    return {**machine_identity(), "loadavg": os.getloadavg()}


def merged(result: dict, into: str) -> dict:
    """The earlier results with this run's arms added to its rows (the command and load of both kept)."""
    old = json.loads(Path(into).read_text())
    if "router" not in old["settings"]["routings"]:  # written before the three arms: its 'uniform' ran the router
        for m in old["models"].values():
            for row in m["caps"].values():
                for e in ("moemesh", "llama.cpp"):
                    if f"{e} uniform" in row["arms"]:
                        row["arms"][f"{e} router"] = row["arms"].pop(f"{e} uniform")
        old["notes"].append("the first run's arms named 'uniform' ran the random model's own router (no trace; "
                            "bench/fullscale.py before commit 'three labelled moemesh routing arms'): relabelled "
                            "'router' when the uniform-trace arm was merged in")
        old["settings"]["routings"] = ["router"] + [r for r in old["settings"]["routings"] if r != "uniform"]
    for name, m in result["models"].items():
        for c, row in m["caps"].items():
            dst = old["models"].setdefault(name, m)["caps"].setdefault(c, row)
            if dst is not row:
                dst["arms"].update(row["arms"])
    old.setdefault("merged_runs", []).append({k: result.get(k) for k in ("date", "command", "loadavg_before",
                                                                         "loadavg_after", "wall_s", "machine")})
    return old


def save(result: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(result))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
