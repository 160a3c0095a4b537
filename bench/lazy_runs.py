"""bench/lazy.py's orchestration: the token stream, one run of an engine in a fresh (possibly capped)
process, one configuration's alternating repeats, the load-under-cap checks, and the per-config
summary (medians, ratios to llama.cpp, disk floors, the issue's goals, plan's prediction)."""
from __future__ import annotations

import json
import math
import os
import random
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
import lazy_hf  # noqa: E402

MIB = 2**20


def token_stream(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(1000 + seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_worker(engine: str, cfg: dict, limit: int | None, timeout: float, args, cap_after_load: bool = False) -> dict:
    """limit: the cgroup limit; with cap_after_load the process loads under limit + --load-headroom
    and lowers its own limit to `limit` once loaded (before any decode step)."""
    if limit is not None and cap_after_load:
        cfg = {**cfg, "cap_after_load": limit}
        limit = limit + args.load_headroom_mib * MIB
    if engine.startswith("moemesh"):
        cmd = [sys.executable, str(HERE / "lazy_worker.py"), json.dumps(cfg)]
    elif engine == lazy_hf.ENGINE:
        cmd = lazy_hf.command(cfg)
    else:
        cmd = [args.llama_python, str(HERE / "lazy_llama.py"), json.dumps(cfg)]
    if limit is not None:
        cgroup.drop_caches()
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    o = cgroup.run(cmd, limit, timeout, name="lazybench", env=env)
    res = None
    for line in o.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    if res is None:
        why = "timeout" if o.returncode is None else ("oom-killed" if (o.cgroup.get("oom_kill") or 0) > 0 else f"exit {o.returncode}")
        res = {"engine": engine, "error": why, "stderr_tail": o.stderr[-1500:]}
    res["process_wall_s"] = o.wall_s
    res["cgroup"] = o.cgroup
    return res


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    s = {"runs": len(runs), "ok": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
    if not ok:
        return s
    keys = ["tokens_per_s", "load_s", "disk_read_bytes_per_token", "major_faults_per_token", "peak_rss_bytes",
            "hit_rate", "resident_hit_rate", "misses_per_token", "bytes_read_per_token", "read_bandwidth_bytes_s", "read_throughput_bytes_s",
            "stall_s_per_token", "expert_fetch_s_per_token", "moe_s_per_token", "prefetch_accuracy",
            "prefetch_issued_per_token", "prefetch_hits_per_token", "load_peak_rss_bytes"]
    for k in keys:
        if any(k in r for r in ok):
            s[k] = median([r.get(k) for r in ok])
    s["tokens_per_s_all"] = [r["tokens_per_s"] for r in ok]
    s["cgroup_max_usage_bytes"] = median([r["cgroup"].get("max_usage_bytes") for r in ok]) if ok[0]["cgroup"] else None
    if "budget" in ok[0]:
        s["budget"] = ok[0]["budget"]
    if "slots" in ok[0]:
        s["slots"] = ok[0]["slots"]
    return s


def parity(a: list[list[float]], b: list[list[float]]) -> dict:
    """Cosine similarity and top-1 agreement of two engines' logits, step by step."""
    cos, top = [], []
    for x, y in zip(a, b):
        dot = sum(p * q for p, q in zip(x, y))
        nx, ny = math.sqrt(sum(p * p for p in x)), math.sqrt(sum(q * q for q in y))
        cos.append(dot / (nx * ny))
        top.append(max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__))
    return {"cosine": cos, "top1_agree": top}


def engine_cfg(engine: str, b: SimpleNamespace, args, cap: int | None, want_logits: int) -> dict:
    """The worker config of one run; b: the bench's store, GGUF, stream and HF checkpoint."""
    if engine == lazy_hf.ENGINE:
        return lazy_hf.worker_cfg(b.hf_path, b.stream, cap is not None, args, want_logits)
    if engine.startswith("moemesh"):
        cfg = {"store": str(b.store), "tokens": b.stream, "warmup": args.warmup, "threads": args.threads,
               "io_threads": args.io_threads, "policy": args.policy, "prefetch": True,
               "ram": None if cap is None else cap - args.margin_mib * MIB, "logits": want_logits}
        if engine == "moemesh-fit":  # the cache sized to what the process really has left under the cap
            cfg["ram"], cfg["slots"] = None, (cap - args.fit_reserve_mib * MIB) // b.st.blob_size
        if engine == "moemesh-compiled":
            cfg["compiled"], cfg["logits"] = True, 0
        return cfg
    nt = args.warmup + (args.tokens if cap is None else args.llama_capped_tokens)
    return {"model": str(b.gguf_path), "tokens": b.stream[:nt], "warmup": args.warmup,
            "threads": args.threads, "repack": cap is None, "logits": want_logits}


def run_config(c: str, b: SimpleNamespace, args) -> tuple[dict[str, list], dict | None]:
    """All repeats of one configuration, engines rotating who goes first; uncapped, also the logits
    parity of moemesh vs llama.cpp (returned) and vs transformers (stored in b.hf)."""
    cap = None if c == "none" else int(b.expert_bytes * int(c[1:]) / 100)
    engines = ["moemesh"] + (["llama.cpp"] if b.has_gguf else []) + (
        ["moemesh-fit"] if cap is not None and args.fit_reserve_mib else []) + ([lazy_hf.ENGINE] if b.hf else []) + (
        ["moemesh-compiled"] if cap is None and args.compiled else [])
    runs: dict[str, list] = {e: [] for e in engines}
    for rep in range(args.repeats):
        order = engines[rep % len(engines):] + engines[: rep % len(engines)]  # rotate who goes first
        for engine in order:
            want_logits = 3 if (c == "none" and rep == 0 and (b.has_gguf or b.hf)) else 0  # for the parity check
            r = run_worker(engine, engine_cfg(engine, b, args, cap, want_logits), cap, args.timeout, args,
                           cap_after_load=True)
            r["engine"], r["config"], r["repeat"] = engine, c, rep
            runs[engine].append(r)
            msg = r.get("error") or f"{r['tokens_per_s']:.2f} tok/s"
            if "hit_rate" in r:
                msg += (f", hit {r['hit_rate']:.2f}, {r['bytes_read_per_token'] / MIB:.0f} MiB/token, "
                        f"stall {r['stall_s_per_token'] * 1e3:.0f} ms/token")
            elif "disk_read_bytes_per_token" in r and "error" not in r:
                msg += f", disk {r['disk_read_bytes_per_token'] / MIB:.0f} MiB/token"
            print(f"[{c} rep {rep}] {engine}: {msg} (process {r['process_wall_s']:.0f} s)", flush=True)
    par = None
    if c == "none" and runs["moemesh"] and (runs.get("llama.cpp") or b.hf):
        a = runs["moemesh"][0].pop("logits", None)
        o = runs["llama.cpp"][0].pop("logits", None) if runs.get("llama.cpp") else None
        if a and o:
            par = parity(a, o)
            print(f"parity (moemesh vs llama.cpp logits, first steps): cosine {[round(x, 4) for x in par['cosine']]}, "
                  f"top-1 agree {par['top1_agree']}", flush=True)
        t = runs[lazy_hf.ENGINE][0].pop("logits", None) if b.hf else None
        if a and t:
            b.hf["parity"] = parity(a, t)
            print(f"parity (moemesh vs transformers logits): cosine {[round(x, 4) for x in b.hf['parity']['cosine']]}, "
                  f"top-1 agree {b.hf['parity']['top1_agree']}", flush=True)
    return runs, par


def load_checks(caps: list[str], b: SimpleNamespace, args) -> dict:
    """moemesh loading under each cap from the first byte (the protocol caps after load), and
    llama.cpp with its default repacking under the smallest cap."""
    extra = {}
    for c in caps:
        cap = int(b.expert_bytes * int(c[1:]) / 100)
        cfg = {"store": str(b.store), "tokens": b.stream[: args.warmup + 2], "warmup": args.warmup,
               "threads": args.threads, "io_threads": args.io_threads, "policy": args.policy, "prefetch": True,
               "ram": cap - args.margin_mib * MIB}
        r = run_worker("moemesh", cfg, cap, args.timeout, args)
        extra[f"moemesh_load_under_cap_{c}"] = {"config": c, "result": r.get("error", "ran"), "tokens_per_s": r.get("tokens_per_s"),
                                                "load_peak_rss_bytes": r.get("load_peak_rss_bytes"), "cgroup": r["cgroup"]}
        print(f"moemesh loading under the {c} cap from the start: {extra[f'moemesh_load_under_cap_{c}']['result']}", flush=True)
    if caps and b.has_gguf and not args.no_repack_oom_check:
        c = min(caps, key=lambda c: int(c[1:]))
        cap = int(b.expert_bytes * int(c[1:]) / 100)
        cfg = {"model": str(b.gguf_path), "tokens": b.stream[: args.warmup + 1], "warmup": args.warmup,
               "threads": args.threads, "repack": True}
        r = run_worker("llama.cpp", cfg, cap, 180, args)
        why = r.get("error", "ran")
        if why == "timeout":
            why = (f"not loaded after 180 s: stuck at the limit reclaiming its own mmap'ed pages while repacking into "
                   f"anonymous memory (cgroup failcnt {r['cgroup'].get('failcnt')}); killed")
        extra["llama_repack_under_cap"] = {"config": c, "result": why,
                                           "tokens_per_s": r.get("tokens_per_s"), "cgroup": r["cgroup"]}
        print(f"llama.cpp with repacking (its default) under {c}: {extra['llama_repack_under_cap']['result']}", flush=True)
    return extra


def config_summary(c: str, runs: dict[str, list], b: SimpleNamespace, args, best_disk: float) -> dict:
    """Medians per engine, ratios to llama.cpp, disk floors (bytes per token / best disk bandwidth),
    the issue's goals where they apply, and `moemesh plan`'s prediction."""
    st = b.st
    cap = None if c == "none" else int(b.expert_bytes * int(c[1:]) / 100)
    row = {"cap_bytes": cap, **{e: summarize(v) for e, v in runs.items()}}
    m, l = row["moemesh"], row.get("llama.cpp") or {}
    for e in runs:
        if e != "llama.cpp" and row[e].get("tokens_per_s") and l.get("tokens_per_s"):
            key = "speedup_moemesh_over_llama" if e == "moemesh" else f"speedup_{e}_over_llama"
            row[key] = row[e]["tokens_per_s"] / l["tokens_per_s"]
    for eng in runs:
        s = row[eng]
        bpt = s.get("bytes_read_per_token", s.get("disk_read_bytes_per_token"))
        if cap is not None and bpt is not None and s.get("tokens_per_s"):
            s["disk_floor_s_per_token"] = bpt / best_disk
            s["time_per_token_s"] = 1 / s["tokens_per_s"]
            s["over_floor"] = s["time_per_token_s"] / s["disk_floor_s_per_token"] if bpt else None
    if cap is not None and m.get("budget"):
        h = min(1.0, m["budget"]["slots"] / (len(st.moe_layers) * st.num_experts))
        top_k = int(st.config["num_experts_per_tok"])
        row["uniform_floor_s_per_token"] = len(st.moe_layers) * top_k * (1 - h) * st.blob_size / best_disk
    row["plan"] = plan_prediction(b.store, None if cap is None else cap - args.margin_mib * MIB, args.probe)
    if not l:
        pass  # no GGUF for llama.cpp: the goals compare with it
    elif cap is not None and int(c[1:]) == 25:  # the goals are for the quarter cap
        row["goal_10x_llama"] = (row.get("speedup_moemesh_over_llama") or 0) >= 10
        row["goal_within_1.5x_floor"] = (m.get("over_floor") or math.inf) <= 1.5
    elif cap is None:
        # either way of running moemesh uncapped counts (--compile is a user-facing flag)
        row["goal_at_least_llama"] = max(row.get("speedup_moemesh_over_llama") or 0,
                                         row.get("speedup_moemesh-compiled_over_llama") or 0) >= 1
    return row


def plan_prediction(store: Path, ram: int | None, probe_path: str) -> dict | None:
    """`moemesh plan STORE --ram RAM --probe PROBE`'s int4 row (uniform routing, shipped IO_FACTOR);
    ram None: no cap (everything resident)."""
    from moemesh.benchkit import probe as probe_mod
    from moemesh.benchkit.probe_check import stale_reason
    from moemesh.commands.plan import plan

    probe = probe_mod.load(Path(probe_path))
    if probe is None:
        return None
    why = stale_reason(probe)
    if why:  # another machine's (or an old) probe predicts another machine: no prediction, said so
        print(f"plan prediction refused: {probe_path}: {why} (run `moemesh bench --quick` here, pass --probe)", flush=True)
        return None
    f = plan(str(store), ram if ram is not None else 2**50, 1, probe)["formats"]["int4"]
    keys = ("tokens_per_s", "fits", "cache_slots", "hit_rate", "disk_floor_s", "memory_floor_s", "compute_floor_s", "why")
    return {"ram_bytes": ram, "probe": probe_path, "probe_date": probe.get("date"), **{k: f.get(k) for k in keys}}

