"""bench/fullscale.py's moemesh worker: one fresh process per run (inside a memory cgroup), printing one
line ``RESULT {json}``.

* ``mode: decode``: bench/lazy_worker.py's teacher-forced decode of a whole GGUF read in place under
  --ram, optionally with a calibrated routing trace replayed as the router's picks
  (benchkit/trace_router.py; ``trace``: a benchkit/routing_trace.py profile name, or ``uniform``: every
  token's picks uniform, the worst case; none: the model's own router, as llama.cpp runs it);
* ``mode: prefill``: time to first token of a ``tokens``-long prompt, layer-major prefill
  (engine/layer_prefill.py: each routed expert read once per layer), bytes read, peak RSS.

    .venv/bin/python bench/fullscale_worker.py '{"mode": "decode", "store": FILE.gguf, "ram": ..., ...}'
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
from lazy_llama import proc_io  # noqa: E402


def replay_hook(cfg: dict, tokens: int):
    """A function installing cfg's trace into a loaded model (None: the weights' own router)."""
    if not cfg.get("trace"):
        return None
    from dataclasses import replace

    from moemesh.benchkit.routing_trace import PROFILES
    from moemesh.benchkit.trace_router import TraceReplay

    if cfg["trace"] == "uniform":  # the worst case: every token picks top_k experts uniformly in every layer
        from moemesh.benchkit.routing_trace import uniform

        layers, experts, top_k = cfg["trace_shape"]
        trace = uniform(tokens, layers, experts, top_k, seed=cfg.get("seed", 0))
        return lambda model: TraceReplay(trace, seed=cfg.get("seed", 0)).install(model)
    prof = PROFILES[cfg["trace"]]
    if cfg.get("trace_shape") and cfg.get("quick"):  # --quick's tiny models: the profile's parameters at their shape
        layers, experts, top_k = cfg["trace_shape"]
        prof = replace(prof, num_layers=layers, num_experts=experts, top_k=top_k)
    trace = prof.generate(tokens, seed=cfg.get("seed", 0))  # [tokens, layers, k]
    return lambda model: TraceReplay(trace, seed=cfg.get("seed", 0)).install(model)


def label(cfg: dict) -> str:
    t = cfg.get("trace")
    return "router (the model's own)" if not t else "uniform (trace)" if t == "uniform" else f"calibrated:{t}"


def decode(cfg: dict) -> dict:
    import lazy_worker
    import moemesh.loading.loader as loader

    hook = replay_hook(cfg, len(cfg["tokens"]) + 8)
    if hook is not None:
        orig = loader.load_model

        def load_and_replay(*a, **k):
            loaded = orig(*a, **k)
            hook(loaded.model)
            return loaded

        loader.load_model = load_and_replay
    out = lazy_worker.moemesh_worker(cfg)
    out["routing"] = label(cfg)
    return out


def prefill(cfg: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(cfg["threads"])
    from moemesh.engine.engine import Engine
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.loading.experts import ExpertOptions
    from moemesh.loading.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(cfg["store"], "auto", experts=ExpertOptions(ram=cfg["ram"], io_threads=cfg["io_threads"],
                                                                    policy=cfg["policy"], prefetch=cfg["prefetch"]))
    load_s = time.perf_counter() - t0
    if cfg.get("cap_after_load"):
        cap = cgroup.apply_cap_to_self(cfg["cap_after_load"])
        if not cap["applied"]:
            return {"engine": "moemesh", "error": "cap could not be applied after load", "cap": cap}
    hook = replay_hook(cfg, len(cfg["tokens"]) + 8)
    if hook is not None:
        hook(loaded.model)
    prov = loaded.provider
    eng = Engine(loaded.model, max_prefill_tokens=cfg.get("chunk", 512), prefill=cfg.get("prefill", "layer"),
                 context_length=len(cfg["tokens"]) + 16)
    io0, b0, m0 = proc_io(), prov.cache.reader.bytes_read, prov.stats()["misses"]
    t = time.perf_counter()
    eng.generate([cfg["tokens"]], SamplingParams(temperature=0.0, max_tokens=1))
    ttft = time.perf_counter() - t
    io1 = proc_io()
    return {"engine": "moemesh", "mode": "prefill", "prefill": cfg.get("prefill", "layer"), "layer_major": eng.layer_major,
            "prompt_tokens": len(cfg["tokens"]), "ttft_s": ttft, "load_s": load_s,
            "prefill_tokens_per_s": len(cfg["tokens"]) / ttft,
            "bytes_read": prov.cache.reader.bytes_read - b0, "misses": prov.stats()["misses"] - m0,
            "disk_read_bytes": io1["read_bytes"] - io0["read_bytes"], "slots": prov.cache.num_slots,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "routing": label(cfg)}


if __name__ == "__main__":
    c = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(prefill(c) if c.get("mode") == "prefill" else decode(c)), flush=True)
