"""bench/lazy.py's moemesh worker: one fresh process per run, started by ``lazy.run_worker``
(possibly inside a memory cgroup). Loads the store (resident experts, or lazy ones with --ram /
slots), optionally lowers its own cgroup limit after load, decodes the teacher-forced stream one
token per step (the engine's planned decode, as ``moemesh generate``; ``eager``: the
modules' forward; or ``--compile``'s graph) and prints one line ``RESULT {json}``: tokens/s,
the expert cache's stats, where the MoE time goes, and (uncapped, ``routing``) the routing trace.

    .venv/bin/python bench/lazy_worker.py '{"store": DIR, "tokens": [...], "warmup": 3, ...}'
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
from lazy_llama import proc_io  # noqa: E402  (stdlib only: shared with the llama.cpp and transformers workers)


def moemesh_worker(cfg: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(cfg["threads"])
    from moemesh.batch import BatchLayout
    from moemesh.errors import MoemeshError
    from moemesh.loading.experts import ExpertOptions
    from moemesh.loading.loader import load_model

    opts = ExpertOptions(ram=cfg.get("ram"), slots=cfg.get("slots"), io_threads=cfg["io_threads"], policy=cfg["policy"],
                         prefetch=cfg["prefetch"]) if (cfg.get("ram") or cfg.get("slots")) else None
    t0 = time.perf_counter()
    try:
        loaded = load_model(cfg["store"], cfg.get("quant", "int4"), experts=opts)
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
        from moemesh.engine.compiled import CompiledDecoder, unsupported_reason

        why = unsupported_reason(model)
        if why:
            return {"engine": "moemesh", "error": f"--compile unsupported: {why}"}
        decoder = CompiledDecoder(model)
    # eager: the modules' forward; otherwise the engine's default decode path (engine/decode_plan.py,
    # what `moemesh generate` runs: its C calls where the plan covers a layer, the modules elsewhere)
    planned = None
    if decoder is None and not cfg.get("eager"):
        from moemesh.engine.decode_plan import PlannedDecode

        planned = PlannedDecode(model)
        planned = planned if planned.active else None
    tokens, warmup = cfg["tokens"], cfg["warmup"]
    steps, logits = [], []
    s0 = snap()
    for i, tok in enumerate(tokens):
        if i == warmup:
            s0 = snap()
        t = time.perf_counter()
        out = None
        if decoder is not None:
            out = decoder.step(tok, cache, 0).reshape(1, -1)  # [1, V]
        elif planned is not None:
            out = planned.maybe_step([[tok]], [False], [0], cache)  # [1, V], or None where the plan declines
        if out is None:
            out = model(torch.tensor([tok]), torch.tensor([i]), cache, layout)  # [1, V]
        steps.append(time.perf_counter() - t)
        if len(logits) < cfg.get("logits", 0):
            logits.append(out[0].float().tolist())
    s1 = snap()
    n = len(tokens) - warmup
    wall = s1["t"] - s0["t"]
    res = {
        "engine": "moemesh", "mode": "lazy" if lazy else "resident", "load_s": load_s, "step_s": steps,
        "decode_path": "compiled" if decoder is not None else "planned" if planned is not None else "eager",
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
            "hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]),  # a prefetched expert counts as a hit
            "resident_hit_rate": (d["hits"] - d["pf_hits"]) / max(1, d["hits"] + d["misses"]),  # already cached
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


if __name__ == "__main__":
    print("RESULT " + json.dumps(moemesh_worker(json.loads(sys.argv[1]))), flush=True)
