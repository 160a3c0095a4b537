"""llama.cpp side of bench/lazy.py: decode a fixed token stream one token at a time with
``Llama.eval([tok])`` and print one JSON line. Runs in the llama-cpp-python venv (no torch, no
moemesh imports), started by bench/lazy.py as a subprocess, possibly inside a memory cgroup.

    /work/llamacpp-venv/bin/python bench/lazy_llama.py '{"model": ..., "tokens": [...], "warmup": 3, ...}'

Options: repack (default true: llama.cpp's default CPU_REPACK buffers, which copy every Q4_0 weight
into anonymous memory at load; false = use_extra_bufts off, so weights stay mmap'ed and page in
from the page cache), lazy_mode (llama.cpp's LLAMA_LAZY_MODE_*; None = its default),
logits (how many steps' logits to return, for the parity check).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time


def proc_io() -> dict:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out


def main() -> None:
    cfg = json.loads(sys.argv[1])
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    orig = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        if not cfg.get("repack", True):
            p.use_extra_bufts = False
        if cfg.get("lazy_mode") is not None:
            p.lazy_mode = int(cfg["lazy_mode"])
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    t0 = time.perf_counter()
    prefill = bool(cfg.get("prefill"))  # time to first token of the whole token list as one prompt
    llm = Llama(model_path=cfg["model"], n_ctx=len(cfg["tokens"]) + 16 if prefill else cfg.get("n_ctx", 256),
                n_threads=cfg.get("threads", 2), n_threads_batch=cfg.get("threads", 2), n_batch=512 if prefill else 32,
                verbose=bool(cfg.get("verbose")))
    load_s = time.perf_counter() - t0
    capped = None
    if cfg.get("cap_after_load"):
        here = os.path.dirname(os.path.abspath(__file__))
        # bench/cgroup.py re-exports moemesh.benchkit.runner (stdlib only); this venv has no moemesh installed
        sys.path[:0] = [here, os.path.join(os.path.dirname(here), "src")]
        import cgroup

        capped = cgroup.apply_cap_to_self(cfg["cap_after_load"])
        if not capped["applied"]:
            print("RESULT " + json.dumps({"engine": "llama.cpp", "error": "cap could not be applied after load", "cap": capped}))
            return
    if prefill:
        io0, t = proc_io(), time.perf_counter()
        llm.eval(cfg["tokens"])  # n_batch 512 at a time, as llama.cpp prefills by default
        ttft, io1 = time.perf_counter() - t, proc_io()
        print("RESULT " + json.dumps({
            "engine": "llama.cpp", "mode": "prefill", "prompt_tokens": len(cfg["tokens"]), "ttft_s": ttft, "load_s": load_s,
            "prefill_tokens_per_s": len(cfg["tokens"]) / ttft, "disk_read_bytes": io1["read_bytes"] - io0["read_bytes"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cap_after_load": capped}), flush=True)
        return
    tokens, warmup = cfg["tokens"], cfg["warmup"]
    n_vocab = llm.n_vocab()
    logits, steps = [], []
    io0 = ru0 = None
    t_start = time.perf_counter()
    for i, tok in enumerate(tokens):
        if i == warmup:
            io0, ru0, t_start = proc_io(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        t = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
        if len(logits) < cfg.get("logits", 0):
            logits.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).astype(float).tolist())
    wall = time.perf_counter() - t_start
    io1, ru1 = proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    timed = len(tokens) - warmup
    out = {
        "engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "load_s": load_s,
        "step_s": steps, "timed_tokens": timed, "timed_wall_s": wall, "tokens_per_s": timed / wall if timed else None,
        "disk_read_bytes_per_token": (io1["read_bytes"] - io0["read_bytes"]) / timed if timed else None,
        "major_faults_per_token": (ru1.ru_majflt - ru0.ru_majflt) / timed if timed else None,
        "peak_rss_bytes": ru1.ru_maxrss * 1024, "repack": cfg.get("repack", True), "lazy_mode": cfg.get("lazy_mode"),
        "cap_after_load": capped,
    }
    if logits:
        out["logits"] = logits
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
