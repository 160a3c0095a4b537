"""transformers side of bench/lazy.py (``--transformers``): decode a fixed token stream one token at
a time with ``model(input_ids=[[tok]], past_key_values=..., use_cache=True)`` under
``torch.inference_mode()`` and print one JSON line ``RESULT {...}``, like bench/lazy_llama.py.
Runs in the project's venv, started by bench/lazy.py as a subprocess, possibly inside a memory
cgroup; the model is benchkit/synth/hf.py's HF checkpoint of the same synthetic weights (fp32).

    .venv/bin/python bench/lazy_hf.py '{"model": HF_DIR, "tokens": [...], "warmup": 3, "threads": 2}'

Options: cap_after_load (lower this process's cgroup limit once loaded, as the other workers do),
logits (how many steps' logits to return, for the parity check).

The rest of this file is bench/lazy.py's side of the transformers peer (kept out of lazy.py):
worker configs, the failure text of a run the cap killed, ratios and markdown pieces.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lazy_llama import proc_io  # noqa: E402  (stdlib only: shared by the three engines' workers)

ENGINE = "transformers"
LABEL = "transformers (fp32)"
GIB = 2**30
LOADED = "lazy_hf: model loaded"


def worker(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg.get("threads", 2))
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    # low_cpu_mem_usage: a no-op since transformers 5 (always on), kept for older versions
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32, low_cpu_mem_usage=True).eval()
    load_s = time.perf_counter() - t0
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(LOADED, file=sys.stderr, flush=True)  # a run killed later says so in its stderr tail
    capped = None
    if cfg.get("cap_after_load"):
        sys.path[:0] = [str(HERE), str(HERE.parent / "src")]
        import cgroup

        capped = cgroup.apply_cap_to_self(cfg["cap_after_load"])
        if not capped["applied"]:
            return {"engine": ENGINE, "error": "cap could not be applied after load", "cap": capped,
                    "load_s": load_s, "load_peak_rss_bytes": load_rss}
    tokens, warmup = cfg["tokens"], cfg["warmup"]
    steps, logits = [], []
    io0 = ru0 = None
    t_start = time.perf_counter()
    with torch.inference_mode():
        past = None
        for i, tok in enumerate(tokens):
            if i == warmup:
                io0, ru0, t_start = proc_io(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(time.perf_counter() - t)
            if len(logits) < cfg.get("logits", 0):
                logits.append(out.logits[0, -1].float().tolist())
    wall = time.perf_counter() - t_start
    io1, ru1 = proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    timed = len(tokens) - warmup
    res = {
        "engine": ENGINE, "transformers": transformers.__version__, "torch": torch.__version__,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "weights_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "load_s": load_s, "step_s": steps, "timed_tokens": timed, "timed_wall_s": wall,
        "tokens_per_s": timed / wall if timed else None,
        "disk_read_bytes_per_token": (io1["read_bytes"] - io0["read_bytes"]) / timed if timed else None,
        "major_faults_per_token": (ru1.ru_majflt - ru0.ru_majflt) / timed if timed else None,
        "peak_rss_bytes": ru1.ru_maxrss * 1024, "load_peak_rss_bytes": load_rss, "cap_after_load": capped,
    }
    if logits:
        res["logits"] = logits
    return res


# --------------------------------------------------------------------------- bench/lazy.py's side
def prepare(root: Path, log=print) -> tuple[Path, dict]:
    """Build (once) ROOT/hf from ROOT/store and its check (benchkit/synth/hf.py); returns (dir, info)."""
    from moemesh.benchkit.synth import hf as synth_hf
    t0 = time.time()
    path, check = synth_hf.ensure(root, log)
    info = {"hf_dir": str(path), "hf_bytes": synth_hf.dir_bytes(path), "check": check, "prepare_s": time.time() - t0}
    log(f"hf checkpoint: {path} ({info['hf_bytes'] / GIB:.2f} GiB); transformers vs moemesh fp32-trunk logits: "
        f"max relative difference {check['max_rel_diff']:.2e}, experts equal {check['all_experts_equal']}")
    return path, info


def command(cfg: dict) -> list[str]:
    return [sys.executable, str(HERE / "lazy_hf.py"), json.dumps(cfg)]


def worker_cfg(hf: Path, stream: list[int], capped: bool, args, logits: int) -> dict:
    """Uncapped: the same steps as moemesh; capped (if it survives loading at all): as few as llama.cpp's."""
    nt = args.warmup + (args.tokens if not capped else args.llama_capped_tokens)
    return {"model": str(hf), "tokens": stream[:nt], "warmup": args.warmup, "threads": args.threads, "logits": logits}


def annotate(summary: dict, runs: dict, hf_bytes: int) -> None:
    """Add to every config row: moemesh(-fit)/transformers ratios where both have a number, and for a
    config where transformers never decoded, the failure as the table shows it (with what it needs:
    its uncapped peak RSS, else the checkpoint's bytes) and the cgroup's readings."""
    ok = [r for r in runs.get("none", {}).get(ENGINE, []) if "error" not in r and r.get("weights_bytes")]
    if ok:  # weights in memory (fp32); peak RSS also counts the mmap'ed checkpoint pages read while loading
        need_txt = (f"needs ~{ok[0]['weights_bytes'] / GIB:.1f} GiB: its fp32 weights; uncapped peak RSS "
                    f"{max(r['peak_rss_bytes'] for r in ok) / GIB:.1f} GiB")
    else:
        need_txt = f"needs > {hf_bytes / GIB:.1f} GiB: the checkpoint's fp32 experts"
    for c, row in summary.items():
        t = row.get(ENGINE)
        if t is None:
            continue
        for e in ("moemesh", "moemesh-fit"):
            if (row.get(e) or {}).get("tokens_per_s") and t.get("tokens_per_s"):
                key = "speedup_moemesh_over_transformers" if e == "moemesh" else f"speedup_{e}_over_transformers"
                row[key] = row[e]["tokens_per_s"] / t["tokens_per_s"]
        failed = [r for r in runs[c][ENGINE] if "error" in r]
        if failed:
            cg = [r.get("cgroup") or {} for r in failed]
            t["failed_cgroup"] = [{k: x.get(k) for k in ("limit_bytes", "max_usage_bytes", "failcnt", "oom_kill")} for x in cg]
        if t.get("ok"):
            continue
        errs = [r["error"] for r in failed]
        killed = all(e == "oom-killed" for e in errs)
        under = "under the cap" if row["cap_bytes"] is not None else "without a cap"
        when = "while decoding" if any(LOADED in r.get("stderr_tail", "") for r in failed) else "while loading"
        if killed:
            t["failure"] = f"killed {under} {when} ({need_txt})"
        else:
            t["failure"] = f"failed {under}: {', '.join(sorted(set(errs)))} ({need_txt})"
        maxu = [x.get("max_usage_bytes") for x in cg if x.get("max_usage_bytes")]
        if maxu:
            t["failure"] += (f"; cgroup max usage {max(maxu) / 2**20:.0f} MiB of {cg[0].get('limit_bytes', 0) / 2**20:.0f} MiB, "
                             f"oom_kill {cg[0].get('oom_kill')}, failcnt {cg[0].get('failcnt')}")


def ratio_header(has: bool) -> tuple[str, str]:
    return (" moemesh / transformers |", "---:|") if has else ("", "")


def ratio_cell(row: dict, has: bool) -> str:
    """Appended to the moemesh / llama.cpp cell: the separator and the moemesh / transformers ratio."""
    if not has:
        return ""
    x = row.get("speedup_moemesh_over_transformers")
    if x is not None:
        return f" | {x:.2f}"
    return " | - (no transformers tok/s)" if ENGINE in row else " | "


def notes(r: dict) -> list[str]:
    t = r.get(ENGINE) or {}
    ck = t.get("check") or {}
    out = [f"- transformers {ck.get('transformers', '?')}: `AutoModelForCausalLM.from_pretrained(dtype=float32)` of "
           f"benchkit/synth/hf.py's HF checkpoint of the same weights ({t.get('hf_bytes', 0) / GIB:.2f} GiB: trunk bf16 as "
           "stored, upcast to fp32 at load; experts dequantized from the store's int4 blobs to fp32, exactly the values "
           f"moemesh and llama.cpp use), experts implementation `{ck.get('experts_implementation')}`, "
           f"{r['settings']['threads']} threads and the same OMP_WAIT_POLICY, one token per step with past_key_values under torch.inference_mode(). "
           "Under a cap it gets the same protocol as the others (load under cap + headroom, then the cap); it has no "
           "way to page its weights, so the cgroup kills it while loading."]
    if ck:
        out.append(f"- checkpoint check: experts equal to the store's dequantized weights: {ck.get('all_experts_equal')}; "
                   f"logits of {len(ck.get('steps', []))} teacher-forced tokens vs moemesh `load_model(store, \"fp32\")` "
                   f"(trunk fp32, experts through moemesh's int4 kernel): max relative difference {ck['max_rel_diff']:.1e} "
                   "(max |diff| / max |logit|).")
    p = t.get("parity")
    if p:
        out.append(f"- parity moemesh (int4 trunk) vs transformers (fp32 trunk), first {len(p['cosine'])} steps (no cap): "
                   f"logits cosine {', '.join(f'{x:.4f}' for x in p['cosine'])}, top-1 agreement {p['top1_agree']}.")
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
