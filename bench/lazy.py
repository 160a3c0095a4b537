"""Lazy experts vs llama.cpp on a Qwen3-30B-A3B-shaped model, with and without a memory cap.

The model (bench/synth.py): Qwen3-30B-A3B's per-layer shapes (hidden 2048, 128 experts, top-8,
expert width 768, 32/4 heads of dim 128, norm_topk_prob), ``--layers`` deep (default 12), a
``--vocab``-token vocabulary (default 32768, see below), int4 experts; written once under
``--work-dir`` as a moemesh expert store and as a Q4_0 GGUF (architecture qwen3moe) with
bit-identical expert weights, and reused across runs.

Every run decodes a fixed pseudo-random token stream one token per step, teacher-forced (the
sampled token is ignored): greedy output of random weights repeats itself and makes any cache look
good. Engines alternate within each repeat; each run is a fresh process. Configurations:

* ``none``: no memory cap, warm page cache. moemesh holds every expert (no --ram), eager and (Qwen3
  shapes, ``--compiled``) with ``--compile``; llama.cpp runs with its defaults (mmap + CPU_REPACK,
  which copies every Q4_0 weight into anonymous memory).
* ``qNN``: a cgroup-v1 memory limit of NN% of the store's expert bytes (page cache counted), page
  cache dropped before each run. moemesh runs lazy experts with --ram = cap - margin; llama.cpp
  runs with repacking off (use_extra_bufts=false) so its weights stay mmap'ed and page through
  the page cache: with repacking on it cannot load under the cap at all (checked once, reported).

Before the runs, O_DIRECT random-read bandwidth is measured on experts.bin (requests of one blob
and 2/4/8 MiB, queue depth 1/4/8); the disk floor of a run is its bytes read per token divided
by the best measured bandwidth. Synthetic weights route (close to) uniformly, the worst case for
an expert cache. Writes bench/results/lazy.{json,md,png}.

Vocabulary: the real 151936 rows would make the trunk (embedding + untied head: 1.2 GB bf16 in
the store, 175 MB Q4_0 read per token by llama.cpp) dominate a 12-layer model and its quarter
cap (1.1 GB); 32768 keeps the head's share of a token's bytes near the real 48-layer model's.

    .venv/bin/python bench/lazy.py [--layers 12] [--configs none,q25,q50] [--repeats 3]

``--model mixtral-8x7b | gpt-oss-120b | deepseek-v3`` runs the same protocol on those models'
per-layer shapes (bench/synth_models.py: GGUFs for llama.cpp as its llama, gpt-oss and deepseek2
architectures) and
writes bench/results/lazy_MODEL.{json,md,png}; each config's row also carries `moemesh plan`'s
prediction (int4, uniform routing) from the machine probe ``--probe``.

``--transformers`` adds transformers as a third engine on the same weights: an fp32 HF checkpoint
written from the store in each architecture's published layout (bench/synth_hf.py), run by
bench/lazy_hf.py under the same protocol; see those files. fp32 experts are big (per MoE layer:
Qwen3-30B-A3B 2.4 GB, Mixtral-8x7B 5.6 GB, gpt-oss-120b 12.7 GB, DeepSeek-V3 45 GB), so use a
shallow model (``--layers 1`` or 2); the run is refused up front, sized from the config, when the
checkpoint would not fit on disk or in transformers' RAM (on a 24 GB / ~32 GB-free-disk machine:
DeepSeek-V3 never, gpt-oss-120b one layer, Mixtral up to ~3 layers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
import lazy_hf  # noqa: E402
from lazy_llama import proc_io  # noqa: E402  (stdlib only: shared with the llama.cpp and transformers workers)
import synth_hf  # noqa: E402
import synth_hf_size  # noqa: E402
import synth_models  # noqa: E402
from lazy_report import markdown, plot  # noqa: E402

from moemesh.benchkit.probe import disk_bandwidth  # noqa: E402  (O_DIRECT random reads, shared with the probe)

RESULTS = HERE / "results"
LLAMA_PY = "/work/llamacpp-venv/bin/python"
MIB = 2**20


# --------------------------------------------------------------------------- workers (subprocesses)
def moemesh_worker(cfg: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(cfg["threads"])
    from moemesh.errors import MoemeshError
    from moemesh.experts.setup import ExpertOptions
    from moemesh.layers.batch import BatchLayout
    from moemesh.models.loader import load_model

    opts = ExpertOptions(ram=cfg.get("ram"), slots=cfg.get("slots"), io_threads=cfg["io_threads"], policy=cfg["policy"],
                         prefetch=cfg["prefetch"]) if (cfg.get("ram") or cfg.get("slots")) else None
    t0 = time.perf_counter()
    try:
        loaded = load_model(cfg["store"], "int4", experts=opts)
    except MoemeshError as exc:
        return {"engine": "moemesh", "error": str(exc)}
    load_s = time.perf_counter() - t0
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    capped = None
    if cfg.get("cap_after_load"):
        capped = cgroup.apply_cap_to_self(cfg["cap_after_load"])
        if not capped["applied"]:
            return {"engine": "moemesh", "error": "cap could not be applied after load", "cap": capped}
    model, prov = loaded.model, loaded.provider
    lazy = hasattr(prov, "cache")

    # where the time goes: wrap the provider's run (the whole MoE mixing) and the cache's
    # expert() (wait for the read + checksum + build the expert views) on this instance only
    timers = {"moe": 0.0, "expert_fetch": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t
        return wrapper

    if prov is not None:
        prov.run = timed(prov.run, "moe")
    if lazy:
        prov.cache.expert = timed(prov.cache.expert, "expert_fetch")

    def snap() -> dict:
        s = {"io": proc_io(), "ru": resource.getrusage(resource.RUSAGE_SELF), "t": time.perf_counter(), **timers}
        if lazy:
            st, rd = prov.cache.stats, prov.cache.reader
            s.update(hits=st.hits, misses=st.misses, stall=st.stall_seconds, pf_issued=st.prefetch_issued,
                     pf_hits=st.prefetch_hits, bytes=rd.bytes_read, read_s=rd.read_seconds,
                     pred_total=prov.predicted_total, pred_right=prov.predicted_right)
        return s

    routing = _record_routing(model) if cfg.get("routing") else None  # router calls: [moe layer, experts...]

    cache = model.new_cache()
    cache.add_sequence(0)
    layout = BatchLayout([0], [1])
    decoder = None
    if cfg.get("compiled"):  # `generate --compile`: one torch.compile graph per step (compiles in the warm-up steps)
        from moemesh.engine.compiled import CompiledDecoder
        from moemesh.engine.step_fn import unsupported_reason

        why = unsupported_reason(model)
        if why:
            return {"engine": "moemesh", "error": f"--compile unsupported: {why}"}
        decoder = CompiledDecoder(model)
    tokens, warmup = cfg["tokens"], cfg["warmup"]
    steps, logits = [], []
    s0 = snap()
    for i, tok in enumerate(tokens):
        if i == warmup:
            s0 = snap()
        t = time.perf_counter()
        if decoder is not None:
            out = decoder.step(tok, cache, 0).reshape(1, -1)  # [1, V]
        else:
            out = model(torch.tensor([tok]), torch.tensor([i]), cache, layout)  # [1, V]
        steps.append(time.perf_counter() - t)
        if len(logits) < cfg.get("logits", 0):
            logits.append(out[0].float().tolist())
    s1 = snap()
    n = len(tokens) - warmup
    wall = s1["t"] - s0["t"]
    res = {
        "engine": "moemesh", "mode": "lazy" if lazy else "resident", "load_s": load_s, "step_s": steps,
        "timed_tokens": n, "timed_wall_s": wall, "tokens_per_s": n / wall,
        "disk_read_bytes_per_token": (s1["io"]["read_bytes"] - s0["io"]["read_bytes"]) / n,
        "major_faults_per_token": (s1["ru"].ru_majflt - s0["ru"].ru_majflt) / n,
        "moe_s_per_token": (s1["moe"] - s0["moe"]) / n,
        "peak_rss_bytes": s1["ru"].ru_maxrss * 1024, "load_peak_rss_bytes": load_rss, "cap_after_load": capped,
    }
    if lazy:
        d = {k: s1[k] - s0[k] for k in ("hits", "misses", "stall", "pf_issued", "pf_hits", "bytes", "read_s",
                                         "pred_total", "pred_right", "expert_fetch")}
        res.update({
            "hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]),
            "misses_per_token": d["misses"] / n,
            "bytes_read_per_token": d["bytes"] / n,
            "read_bandwidth_bytes_s": d["bytes"] / d["read_s"] if d["read_s"] else None,  # per request, overlapped
            "read_throughput_bytes_s": d["bytes"] / wall,  # achieved over the decode wall time
            "stall_s_per_token": d["stall"] / n,
            "expert_fetch_s_per_token": d["expert_fetch"] / n,  # stall + checksum + building the views
            "prefetch_accuracy": d["pred_right"] / d["pred_total"] if d["pred_total"] else None,
            "prefetch_issued_per_token": d["pf_issued"] / n,
            "prefetch_hits_per_token": d["pf_hits"] / n,
            "provider_stats": prov.stats(), "slots": prov.cache.num_slots,
        })
        if loaded.budget is not None:
            b = loaded.budget
            res["budget"] = {"ram": b.ram, "trunk": b.trunk, "kv_reserve": b.kv_reserve, "overhead": b.overhead,
                             "expert_cache": b.expert_cache, "slots": b.slots}
    if logits:
        res["logits"] = logits
    if routing is not None:
        res["routing_trace"] = routing
        res["routing_counts"] = routing_counts(routing, model.args.num_experts)
    return res


def _record_routing(model) -> list[list[int]]:
    """Hook every MoE router: one entry per router call and token, in order, ``[i, e1, ..., ek]`` for
    the i-th MoE layer's picks (bench/plan_check.py replays it through the cache's policy)."""
    from moemesh.layers.moe import MoEBlock

    blocks = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoEBlock)]
    trace: list[list[int]] = []

    def hook(i):
        def fn(_module, _inputs, out):
            for row in out[0].tolist():  # out = (ids [T, A], weights [T, A])
                trace.append([i, *row])
        return fn

    for i, block in enumerate(blocks):
        block.router.register_forward_hook(hook(i))
    return trace


def routing_counts(trace: list[list[int]], num_experts: int) -> list[list[int]]:
    """counts[i][e] = how often the i-th MoE layer picked expert e in the trace."""
    layers = 1 + max((c[0] for c in trace), default=-1)
    counts = [[0] * num_experts for _ in range(layers)]
    for i, *experts in trace:
        for e in experts:
            counts[i][e] += 1
    return counts


# --------------------------------------------------------------------------- orchestration
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
        cmd = [sys.executable, str(HERE / "lazy.py"), "--worker", json.dumps(cfg)]
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
            "hit_rate", "misses_per_token", "bytes_read_per_token", "read_bandwidth_bytes_s", "read_throughput_bytes_s",
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


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup (kill the worker, remove its cgroup)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(synth_models.MODELS), default="qwen3-30b-a3b",
                    help="whose per-layer shapes the synthetic model has (bench/synth_models.py)")
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int, help="depth (default per model: qwen3 12, mixtral 7, gpt-oss 2, deepseek 1)")
    ap.add_argument("--vocab", type=int, help="vocabulary (default 32768; mixtral 32000, its real size)")
    ap.add_argument("--probe", default=str(RESULTS / "plan_check_probe.json"),
                    help="machine probe (`moemesh bench --quick`) for `moemesh plan`'s predictions of each config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="none,q25,q50", help="none and/or qNN (cap = NN%% of the expert bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (cold misses land here)")
    ap.add_argument("--tokens", type=int, default=24, help="timed decode steps per run")
    ap.add_argument("--llama-capped-tokens", type=int, default=8, help="timed steps for llama.cpp under a cap")
    ap.add_argument("--margin-mib", type=int, default=128, help="moemesh --ram = cap - margin")
    ap.add_argument("--load-headroom-mib", type=int, default=3072,
                    help="capped runs load under cap + this, then lower their own limit to the cap before decoding "
                         "(moemesh's load-time peak exceeds its --ram budget; see the strict check)")
    ap.add_argument("--fit-reserve-mib", type=int, default=None,
                    help="capped configs also run 'moemesh-fit': slots = (cap - this) / blob, i.e. the cache sized to the "
                         "measured steady-state use (~490 MiB anonymous after load + hot pages); 0 = skip; "
                         "default 640 for qwen3, 0 for the other models (the reserve was measured on qwen3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for both engines ('' = their default). On a shared, oversubscribed machine "
                         "spinning OpenMP threads collapse both engines' 2-thread decode (measured 5-20x slower)")
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                    help="the uncapped config also runs moemesh --compile (all experts resident, one compiled graph per "
                         "step; default on for qwen3 shapes, whose layers it covers)")
    ap.add_argument("--policy", default="lfu")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--llama-python", default=LLAMA_PY)
    ap.add_argument("--no-repack-oom-check", action="store_true", help="skip the one llama.cpp run with repacking under the smallest cap")
    ap.add_argument("--out", help="results path without suffix (default bench/results/lazy for qwen3, lazy_MODEL otherwise)")
    ap.add_argument("--transformers", action="store_true",
                    help="also run transformers (fp32 HF checkpoint of the same weights, bench/synth_hf.py: per layer "
                         "~2.4 GB qwen3, 5.6 GB mixtral, 12.7 GB gpt-oss, 45 GB deepseek; use --layers 1-2) in every config")
    args = ap.parse_args()
    spec = synth_models.MODELS[args.model]
    args.layers, args.vocab = args.layers or spec.layers, args.vocab or spec.vocab
    if args.compiled is None:
        args.compiled = args.model == "qwen3-30b-a3b"
    if args.fit_reserve_mib is None:
        args.fit_reserve_mib = 640 if args.model == "qwen3-30b-a3b" else 0
    if args.out is None:
        args.out = str(RESULTS / ("lazy" if args.model == "qwen3-30b-a3b" else f"lazy_{args.model}"))
    if args.worker:
        print("RESULT " + json.dumps(moemesh_worker(json.loads(args.worker))), flush=True)
        return
    if not cgroup.available():
        sys.exit("bench/lazy.py needs root and the cgroup-v1 memory controller (memory caps)")
    if args.transformers and not (synth_hf.hf_dir(synth_models.model_dir(
            Path(args.work_dir), args.model, args.layers, args.vocab, args.seed)) / "DONE").is_file():
        # before generating the store: sized from the config (the disk is checked again right before writing)
        synth_hf_size.require_fits(spec.config(args.layers, args.vocab), Path(args.work_dir))

    t_start = time.time()
    load_before = os.getloadavg()
    print(f"model: {args.model}, {args.layers} layers, vocab {args.vocab} (under {args.work_dir})", flush=True)
    t0 = time.time()
    root = synth_models.build(Path(args.work_dir), args.model, args.layers, args.vocab, args.seed,
                              log=lambda m: print(m, flush=True))
    gen_s = time.time() - t0
    store, gguf_path = root / "store", root / "model.gguf"
    from moemesh.experts.store import ExpertStore

    st = ExpertStore(store)
    expert_bytes = st.expert_bytes()
    has_gguf = gguf_path.is_file()
    top_k = int(st.config["num_experts_per_tok"])
    info = {
        "name": args.model, "model_type": st.config["model_type"], "layers": args.layers, "moe_layers": len(st.moe_layers),
        "vocab": args.vocab, "hidden": st.config["hidden_size"], "experts_per_layer": st.num_experts, "top_k": top_k,
        "blob_bytes": st.blob_size, "expert_bytes": expert_bytes,
        "trunk_file_bytes": st.trunk_path.stat().st_size, "gguf_bytes": gguf_path.stat().st_size if has_gguf else None,
        "store_dir": str(store), "gguf": str(gguf_path) if has_gguf else None,
    }
    print(f"store: {expert_bytes / 2**30:.2f} GiB of experts ({st.blob_size / MIB:.2f} MiB each), "
          f"gguf {(info['gguf_bytes'] or 0) / 2**30:.2f} GiB; ready in {gen_s:.0f} s", flush=True)

    hf = None
    if args.transformers:
        hf_path, hf = lazy_hf.prepare(root, log=lambda m: print(m, flush=True))
    print("disk: O_DIRECT random reads on experts.bin ...", flush=True)
    disk = disk_bandwidth(st.experts_path, [st.blob_size, 2 * MIB, 4 * MIB, 8 * MIB], [1, 4, 8], seconds=1.5)
    best = max(d["bytes_s"] for d in disk)
    for d in disk:
        print(f"  {d['request_bytes'] / MIB:5.2f} MiB x QD{d['queue_depth']}: {d['bytes_s'] / 1e9:.2f} GB/s")

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    n_all = args.warmup + args.tokens
    stream = token_stream(n_all, args.vocab, args.seed)
    runs: dict[str, dict[str, list]] = {}
    par = None
    extra = {}
    for c in configs:
        cap = None if c == "none" else int(expert_bytes * int(c[1:]) / 100)
        engines = ["moemesh"] + (["llama.cpp"] if has_gguf else []) + (
            ["moemesh-fit"] if cap is not None and args.fit_reserve_mib else []) + ([lazy_hf.ENGINE] if hf else []) + (
            ["moemesh-compiled"] if cap is None and args.compiled else [])
        runs[c] = {e: [] for e in engines}
        for rep in range(args.repeats):
            order = engines[rep % len(engines):] + engines[: rep % len(engines)]  # rotate who goes first
            for engine in order:
                want_logits = 3 if (c == "none" and rep == 0 and (has_gguf or hf)) else 0  # for the parity check
                if engine == lazy_hf.ENGINE:
                    cfg = lazy_hf.worker_cfg(hf_path, stream, cap is not None, args, want_logits)
                elif engine.startswith("moemesh"):
                    cfg = {"store": str(store), "tokens": stream, "warmup": args.warmup, "threads": args.threads,
                           "io_threads": args.io_threads, "policy": args.policy, "prefetch": True,
                           "ram": None if cap is None else cap - args.margin_mib * MIB, "logits": want_logits}
                    if engine == "moemesh-fit":  # the cache sized to what the process really has left under the cap
                        cfg["ram"], cfg["slots"] = None, (cap - args.fit_reserve_mib * MIB) // st.blob_size
                    if engine == "moemesh-compiled":
                        cfg["compiled"], cfg["logits"] = True, 0
                else:
                    nt = args.warmup + (args.tokens if cap is None else args.llama_capped_tokens)
                    cfg = {"model": str(gguf_path), "tokens": stream[:nt], "warmup": args.warmup,
                           "threads": args.threads, "repack": cap is None, "logits": want_logits}
                r = run_worker(engine, cfg, cap, args.timeout, args, cap_after_load=True)
                r["engine"], r["config"], r["repeat"] = engine, c, rep
                runs[c][engine].append(r)
                msg = r.get("error") or f"{r['tokens_per_s']:.2f} tok/s"
                if "hit_rate" in r:
                    msg += (f", hit {r['hit_rate']:.2f}, {r['bytes_read_per_token'] / MIB:.0f} MiB/token, "
                            f"stall {r['stall_s_per_token'] * 1e3:.0f} ms/token")
                elif "disk_read_bytes_per_token" in r and "error" not in r:
                    msg += f", disk {r['disk_read_bytes_per_token'] / MIB:.0f} MiB/token"
                print(f"[{c} rep {rep}] {engine}: {msg} (process {r['process_wall_s']:.0f} s)", flush=True)
        if c == "none" and runs[c]["moemesh"] and (runs[c].get("llama.cpp") or hf):
            a = runs[c]["moemesh"][0].pop("logits", None)
            b = runs[c]["llama.cpp"][0].pop("logits", None) if runs[c].get("llama.cpp") else None
            if a and b:
                par = parity(a, b)
                print(f"parity (moemesh vs llama.cpp logits, first steps): cosine {[round(x, 4) for x in par['cosine']]}, "
                      f"top-1 agree {par['top1_agree']}", flush=True)
            t = runs[c][lazy_hf.ENGINE][0].pop("logits", None) if hf else None
            if a and t:
                hf["parity"] = parity(a, t)
                print(f"parity (moemesh vs transformers logits): cosine {[round(x, 4) for x in hf['parity']['cosine']]}, "
                      f"top-1 agree {hf['parity']['top1_agree']}", flush=True)
    caps = [c for c in configs if c != "none"]
    for c in caps:  # moemesh loading under the cap from the first byte (the protocol above caps after load)
        cap = int(expert_bytes * int(c[1:]) / 100)
        cfg = {"store": str(store), "tokens": stream[: args.warmup + 2], "warmup": args.warmup, "threads": args.threads,
               "io_threads": args.io_threads, "policy": args.policy, "prefetch": True, "ram": cap - args.margin_mib * MIB}
        r = run_worker("moemesh", cfg, cap, args.timeout, args)
        extra[f"moemesh_load_under_cap_{c}"] = {"config": c, "result": r.get("error", "ran"), "tokens_per_s": r.get("tokens_per_s"),
                                                "load_peak_rss_bytes": r.get("load_peak_rss_bytes"), "cgroup": r["cgroup"]}
        print(f"moemesh loading under the {c} cap from the start: {extra[f'moemesh_load_under_cap_{c}']['result']}", flush=True)
    if caps and has_gguf and not args.no_repack_oom_check:
        c = min(caps, key=lambda c: int(c[1:]))
        cap = int(expert_bytes * int(c[1:]) / 100)
        cfg = {"model": str(gguf_path), "tokens": stream[: args.warmup + 1], "warmup": args.warmup,
               "threads": args.threads, "repack": True}
        r = run_worker("llama.cpp", cfg, cap, 180, args)
        why = r.get("error", "ran")
        if why == "timeout":
            why = (f"not loaded after 180 s: stuck at the limit reclaiming its own mmap'ed pages while repacking into "
                   f"anonymous memory (cgroup failcnt {r['cgroup'].get('failcnt')}); killed")
        extra["llama_repack_under_cap"] = {"config": c, "result": why,
                                           "tokens_per_s": r.get("tokens_per_s"), "cgroup": r["cgroup"]}
        print(f"llama.cpp with repacking (its default) under {c}: {extra['llama_repack_under_cap']['result']}", flush=True)

    summary = {}
    for c in configs:
        cap = None if c == "none" else int(expert_bytes * int(c[1:]) / 100)
        row = {"cap_bytes": cap, **{e: summarize(v) for e, v in runs[c].items()}}
        m, l = row["moemesh"], row.get("llama.cpp") or {}
        for e in runs[c]:
            if e != "llama.cpp" and row[e].get("tokens_per_s") and l.get("tokens_per_s"):
                key = "speedup_moemesh_over_llama" if e == "moemesh" else f"speedup_{e}_over_llama"
                row[key] = row[e]["tokens_per_s"] / l["tokens_per_s"]
        for eng in runs[c]:
            s = row[eng]
            bpt = s.get("bytes_read_per_token", s.get("disk_read_bytes_per_token"))
            if cap is not None and bpt is not None and s.get("tokens_per_s"):
                s["disk_floor_s_per_token"] = bpt / best
                s["time_per_token_s"] = 1 / s["tokens_per_s"]
                s["over_floor"] = s["time_per_token_s"] / s["disk_floor_s_per_token"] if bpt else None
        if cap is not None and m.get("budget"):
            h = min(1.0, m["budget"]["slots"] / (len(st.moe_layers) * st.num_experts))
            row["uniform_floor_s_per_token"] = len(st.moe_layers) * top_k * (1 - h) * st.blob_size / best
        row["plan"] = plan_prediction(store, None if cap is None else cap - args.margin_mib * MIB, args.probe)
        if not l:
            pass  # no GGUF for llama.cpp: the goals compare with it
        elif cap is not None and int(c[1:]) == 25:  # the goals are for the quarter cap
            row["goal_10x_llama"] = (row.get("speedup_moemesh_over_llama") or 0) >= 10
            row["goal_within_1.5x_floor"] = (m.get("over_floor") or math.inf) <= 1.5
        elif cap is None:
            # either way of running moemesh uncapped counts (--compile is a user-facing flag)
            row["goal_at_least_llama"] = max(row.get("speedup_moemesh_over_llama") or 0,
                                             row.get("speedup_moemesh-compiled_over_llama") or 0) >= 1
        summary[c] = row
    if hf:
        lazy_hf.annotate(summary, runs, hf["hf_bytes"])

    import torch

    result = {
        "bench": "lazy", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "bench/lazy.py " + shlex.join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch": torch.__version__,
                    "note": "2 cores shared with other engineers' jobs: timings are noisy"},
        "model": info, "generation_s": gen_s, "disk": {"measurements": disk, "best_bytes_s": best},
        "settings": {k: v for k, v in vars(args).items() if k != "worker" and (k != "transformers" or v)},
        "parity": par, "summary": summary, **({lazy_hf.ENGINE: hf} if hf else {}),
        "extra": extra, "runs": runs, "wall_s": time.time() - t_start,
        "notes": ["synthetic random weights route close to uniformly: the worst case for an expert cache",
                  "teacher-forced fixed pseudo-random token stream; warmup steps untimed"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        pass
    print(out.with_suffix(".md").read_text())


def plan_prediction(store: Path, ram: int | None, probe_path: str) -> dict | None:
    """`moemesh plan STORE --ram RAM --probe PROBE`'s int4 row (uniform routing, shipped IO_FACTOR);
    ram None: no cap (everything resident)."""
    from moemesh.benchkit import probe as probe_mod
    from moemesh.commands.plan import plan

    probe = probe_mod.load(Path(probe_path))
    if probe is None:
        return None
    f = plan(str(store), ram if ram is not None else 2**50, 1, probe)["formats"]["int4"]
    keys = ("tokens_per_s", "fits", "cache_slots", "hit_rate", "disk_floor_s", "memory_floor_s", "compute_floor_s", "why")
    return {"ram_bytes": ram, "probe": probe_path, "probe_date": probe.get("date"), **{k: f.get(k) for k in keys}}


if __name__ == "__main__":
    main()
