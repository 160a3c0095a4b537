"""Lazy experts vs llama.cpp on a Qwen3-30B-A3B-shaped model, with and without a memory cap.

The model (benchkit/synth/core.py): Qwen3-30B-A3B's per-layer shapes (hidden 2048, 128 experts, top-8,
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
per-layer shapes (benchkit/synth/models.py: GGUFs for llama.cpp as its llama, gpt-oss and deepseek2
architectures) and
writes bench/results/lazy_MODEL.{json,md,png}; each config's row also carries `moemesh plan`'s
prediction (int4, uniform routing) from the machine probe ``--probe``.

``--transformers`` adds transformers as a third engine on the same weights: an fp32 HF checkpoint
written from the store in each architecture's published layout (benchkit/synth/hf.py), run by
bench/lazy_hf.py under the same protocol; see those files. fp32 experts are big (per MoE layer:
Qwen3-30B-A3B 2.4 GB, Mixtral-8x7B 5.6 GB, gpt-oss-120b 12.7 GB, DeepSeek-V3 45 GB), so use a
shallow model (``--layers 1`` or 2); the run is refused up front, sized from the config, when the
checkpoint would not fit on disk or in transformers' RAM (on a 24 GB / ~32 GB-free-disk machine:
DeepSeek-V3 never, gpt-oss-120b one layer, Mixtral up to ~3 layers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
import lazy_hf  # noqa: E402
from lazy_report import markdown, plot  # noqa: E402
from lazy_runs import config_summary, load_checks, run_config, token_stream  # noqa: E402
from moemesh.benchkit.probe import disk_bandwidth  # noqa: E402  (O_DIRECT random reads, shared with the probe)
from moemesh.benchkit.suites import DEFAULT_LLAMA_PYTHON  # noqa: E402
from moemesh.benchkit.synth import hf as synth_hf
from moemesh.benchkit.synth import hf_size as synth_hf_size
from moemesh.benchkit.synth import models as synth_models

RESULTS = HERE / "results"
LLAMA_PY = os.environ.get("MOEMESH_LLAMA_PYTHON") or DEFAULT_LLAMA_PYTHON  # `make peers` builds it
MIB = 2**20


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup (kill the worker, remove its cgroup)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(synth_models.MODELS), default="qwen3-30b-a3b",
                    help="whose per-layer shapes the synthetic model has (benchkit/synth/models.py)")
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
                    help="also run transformers (fp32 HF checkpoint of the same weights, benchkit/synth/hf.py: per layer "
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
    from moemesh.store.expert_store import ExpertStore

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

    hf = hf_path = None
    if args.transformers:
        hf_path, hf = lazy_hf.prepare(root, log=lambda m: print(m, flush=True))
    print("disk: O_DIRECT random reads on experts.bin ...", flush=True)
    disk = disk_bandwidth(st.experts_path, [st.blob_size, 2 * MIB, 4 * MIB, 8 * MIB], [1, 4, 8], seconds=1.5)
    best = max(d["bytes_s"] for d in disk)
    for d in disk:
        print(f"  {d['request_bytes'] / MIB:5.2f} MiB x QD{d['queue_depth']}: {d['bytes_s'] / 1e9:.2f} GB/s")

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bench = SimpleNamespace(store=store, st=st, gguf_path=gguf_path, has_gguf=has_gguf, expert_bytes=expert_bytes,
                            hf=hf, hf_path=hf_path, stream=token_stream(args.warmup + args.tokens, args.vocab, args.seed))
    runs: dict[str, dict[str, list]] = {}
    par = None
    for c in configs:
        runs[c], p = run_config(c, bench, args)
        par = par or p
    extra = load_checks([c for c in configs if c != "none"], bench, args)
    summary = {c: config_summary(c, runs[c], bench, args, best) for c in configs}
    if hf:
        lazy_hf.annotate(summary, runs, hf["hf_bytes"])

    import torch

    result = {
        "bench": "lazy", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "bench/lazy.py " + shlex.join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch": torch.__version__,
                    "note": "2 cores shared with other engineers' jobs: timings are noisy"},
        "model": info, "generation_s": gen_s, "disk": {"measurements": disk, "best_bytes_s": best},
        "settings": {k: v for k, v in vars(args).items() if k != "transformers" or v},
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


if __name__ == "__main__":
    main()
