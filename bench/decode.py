"""Decode and prefill speed: moemesh's default path vs llama.cpp on every row of issue 22's table and the demo.

    .venv/bin/python bench/decode.py [--models smollm2,demo,qwen3-30b-a3b,...] [--rounds 3]
    .venv/bin/python bench/decode.py --quick        # a smoke run: SmolLM2 alone, moemesh alone (no peer)

Rows (``--models``, default all):

* ``smollm2``: the embedded SmolLM2-135M GGUF (Q4_1), the same file for both engines;
* ``demo``: the ``make run`` model, SmolLM2 split into 16 experts / 15 per token by ``moemesh moefy``
  (made once, ~/.cache/moemesh/smollm2-moe-16x15); moemesh runs its int4 expert store (what ``make run``
  runs, here with every expert resident), llama.cpp a Q4_0 GGUF written from the same checkpoint
  (benchkit/synth/gguf_mixtral.py: same shapes and bytes per weight, not the same bits);
* ``qwen3-30b-a3b`` (12 layers), ``gpt-oss-120b`` (2), ``mixtral-8x7b`` (7), ``deepseek-v3`` (1): the
  synthetic models of bench/lazy.py (benchkit/synth: the real per-layer shapes, random weights, vocab
  32768 (Mixtral 32000)), written once under ``--work-dir`` (the same files bench/lazy.py uses) as a
  moemesh expert store and a Q4_0 GGUF with bit-identical experts; moemesh loads the store with an
  int4 trunk (the GGUF's trunk is Q4_0) and every expert resident.

Each run is a fresh process: load, prefill a ``--prompt-tokens`` prompt (timed: prompt -> first
token), ``--warmup`` untimed decode steps, then ``--decode-tokens`` timed greedy decode steps.
moemesh runs exactly what ``moemesh generate`` runs without flags (``Engine.step``: the eager forward
and the sampler, one sequence). Engines alternate inside each round, the order flipped every round,
so other load on the machine hits both alike; medians over rounds. Both use ``--threads`` threads.
Writes bench/results/decode.{json,md} and regenerates the README's table (bench/readme_table.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS = ("smollm2", "demo", "qwen3-30b-a3b", "gpt-oss-120b", "mixtral-8x7b", "deepseek-v3")
TITLES = {"smollm2": "SmolLM2-135M", "demo": "demo MoE (SmolLM2 16x15)"}
DEMO_DIR = Path.home() / ".cache" / "moemesh" / "smollm2-moe-16x15"
PROMPT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a notebook and a "
          "thermos of tea. From the gallery he could see the fishing boats returning, the gulls settling on the "
          "harbour wall and, far out, the dark line where the storm clouds gathered. He wrote down the wind, the")
T_START = time.perf_counter()


# ---------------------------------------------------------------- the moemesh worker (a fresh process per run)
def moemesh_worker(cfg: dict) -> dict:
    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(cfg["threads"])
    from moemesh.engine.engine import Engine
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.loading.loader import load_model
    from moemesh.loading.source import resolve_model_path
    from moemesh.weights.trunk_cache import TrunkCache

    trunk = TrunkCache.for_model(resolve_model_path(cfg["model"]), cfg["quant"])  # before the load: warm or not
    warm = trunk is not None and bool(trunk.entries)
    t0 = time.perf_counter()
    import_s = t0 - t_import
    loaded = load_model(cfg["model"], cfg["quant"])
    load_s = time.perf_counter() - t0
    from decode_floor import decode_bytes

    nbytes = decode_bytes(loaded.model)["total"]
    engine = Engine(loaded.model)
    stamps: list[float] = []
    t0 = time.perf_counter()
    n = cfg["warmup"] + cfg["decode"]
    (seq,) = engine.generate([cfg["prompt"]], SamplingParams(temperature=0.0, max_tokens=n + 1),
                             on_token=lambda out: stamps.append(time.perf_counter()))
    prefill_s = stamps[0] - t0
    decode_s = stamps[-1] - stamps[cfg["warmup"]]
    return {"engine": "moemesh", "import_s": import_s, "load_s": load_s, "prefill_s": prefill_s,
            "prefill_tok_s": len(cfg["prompt"]) / prefill_s, "decode_tok_s": cfg["decode"] / decode_s,
            "first_token_s": stamps[0] - T_START, "tokens": seq.output_ids, "quant": cfg["quant"],
            "bytes_per_token": nbytes, "trunk_cache": "mapped" if warm else "converted"}


# ---------------------------------------------------------------- the rows
def prepare(key: str, work_dir: Path, log) -> dict:
    """Build (once) what a row runs: {"moemesh": model path or name, "gguf": path, "quant", "vocab", "layers"}."""
    if key == "smollm2":
        from moemesh.loading.source import resolve_model_path

        return {"moemesh": "smollm2", "gguf": str(resolve_model_path("smollm2")), "quant": "auto", "vocab": 49152,
                "layers": 30}
    if key == "demo":
        from moemesh.benchkit.synth.gguf_mixtral import write_mixtral_gguf
        from moemesh.loading.loader import cached_store

        if not (DEMO_DIR / "config.json").is_file():
            log(f"demo: splitting SmolLM2 into experts once (moemesh moefy -> {DEMO_DIR}) ...")
            subprocess.run([sys.executable, "-m", "moemesh.cli", "moefy", "smollm2", str(DEMO_DIR), "--experts", "16",
                            "--top-k", "15"], check=True)
        store = cached_store(DEMO_DIR, "int4")  # what `make run` runs (made on first use, int4 trunk)
        gguf = work_dir / "demo-smollm2-moe-16x15-q4_0.gguf"
        if not gguf.is_file():
            log(f"demo: writing {gguf} ...")
            work_dir.mkdir(parents=True, exist_ok=True)
            write_mixtral_gguf(DEMO_DIR, gguf)
        cfg = json.loads((DEMO_DIR / "config.json").read_text())
        return {"moemesh": str(store), "gguf": str(gguf), "quant": "auto", "vocab": cfg["vocab_size"],
                "layers": cfg["num_hidden_layers"]}
    from moemesh.benchkit.synth import models as synth_models

    m = synth_models.MODELS[key]
    log(f"{key}: building the synthetic model once under {work_dir} (reused afterwards) ...")
    d = synth_models.build(work_dir, key, log=log)
    return {"moemesh": str(d / "store"), "gguf": str(d / "model.gguf"), "quant": "int4", "vocab": m.vocab,
            "layers": m.layers}


def prompt_ids(key: str, row: dict, n: int) -> list[int]:
    """The same prompt ids for both engines: SmolLM2's tokens of PROMPT (the demo shares its vocabulary),
    repeated to n; pseudo-random ids for the synthetic models (their vocabulary is only ids)."""
    if key in ("smollm2", "demo"):
        from moemesh.loading.source import resolve_model_path
        from moemesh.tokenizer.tokenizer import Tokenizer

        ids = Tokenizer.from_gguf(resolve_model_path("smollm2")).encode(PROMPT, add_special_tokens=False)
        return (ids * (n // len(ids) + 1))[:n]
    g = random.Random(0)
    return [g.randrange(3, row["vocab"]) for _ in range(n)]


# ---------------------------------------------------------------- running
def run_one(engine: str, row: dict, args, prompt: list[int]) -> dict:
    cfg = {"prompt": prompt, "warmup": args.warmup, "decode": args.decode_tokens, "threads": args.threads}
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if engine == "floor":  # the read bandwidth, a fresh process beside the engines (decode_floor.py)
        cmd = [sys.executable, str(HERE / "decode_floor.py"), "--threads", str(args.threads)]
    elif engine == "moemesh":
        cmd = [sys.executable, __file__, "--worker", json.dumps({**cfg, "model": row["moemesh"], "quant": row["quant"]})]
    else:
        n_ctx = len(prompt) + args.warmup + args.decode_tokens + 8
        cmd = [args.llama_python, str(HERE / "decode_llama.py"), json.dumps({**cfg, "model": row["gguf"], "n_ctx": n_ctx})]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        return {"engine": engine, "error": (r.stderr or r.stdout)[-2000:]}
    return {"read_gb_s": float(line.split()[1])} if engine == "floor" else json.loads(line[len("RESULT "):])


def summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error") if runs else "no runs"}
    med = lambda k: statistics.median(r[k] for r in ok)  # noqa: E731
    return {"decode_tok_s_median": med("decode_tok_s"), "prefill_tok_s_median": med("prefill_tok_s"),
            "load_s_median": med("load_s"), "first_token_s_median": med("first_token_s"),
            "import_s_median": med("import_s") if all("import_s" in r for r in ok) else None,
            "decode_tok_s_all": [r["decode_tok_s"] for r in ok], "prefill_tok_s_all": [r["prefill_tok_s"] for r in ok],
            "runs": len(ok), "failed": len(runs) - len(ok), "version": ok[0].get("version"),
            "trunk_cache": [r.get("trunk_cache") for r in ok]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(ROWS), help=f"comma-separated rows: {', '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps after the prefill")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default="/work/bench-data", help="where the synthetic models live (bench/lazy.py's)")
    ap.add_argument("--llama-python", default=None, help="python of llama-cpp-python's venv (default: `make peers`'s)")
    ap.add_argument("--omp-wait-policy", default="", help="OMP_WAIT_POLICY for both engines ('' = their default)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: SmolLM2 only, one round, 8 decode tokens, moemesh alone (llama.cpp skipped)")
    ap.add_argument("--out", default=str(RESULTS / "decode"), help="results path without extension")
    ap.add_argument("--update", action="store_true",
                    help="rerun only --models' rows; the other rows of the existing results are kept as they were "
                         "measured (each row records its own command, time and load average)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(moemesh_worker(json.loads(args.worker))), flush=True)
        return 0

    from decode_report import markdown
    from moemesh.benchkit.results import write_results
    from moemesh.benchkit.suites import DEFAULT_LLAMA_PYTHON

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    notes: list[str] = []
    if args.quick:
        args.models, args.rounds, args.decode_tokens, args.warmup, args.prompt_tokens = "smollm2", 1, 8, 2, 16
        engines = ["moemesh"]
        notes.append("--quick: llama.cpp skipped (a smoke run of the harness, not a comparison)")
        log(notes[-1])
    else:
        args.llama_python = args.llama_python or os.environ.get("MOEMESH_LLAMA_PYTHON") or DEFAULT_LLAMA_PYTHON
        probe = subprocess.run([args.llama_python, "-c", "import llama_cpp"], capture_output=True) \
            if Path(args.llama_python).exists() else None
        if probe is None or probe.returncode != 0:
            print(f"llama.cpp's Python binding is not importable by {args.llama_python}: build it once with "
                  "`make peers` (or pass --llama-python); `--quick` runs moemesh alone", file=sys.stderr)
            return 2
        engines = ["moemesh", "llama.cpp"]
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; have {', '.join(ROWS)}")
    work_dir = Path(args.work_dir)
    load_before = list(os.getloadavg())
    out_path = Path(args.out)
    if args.quick and out_path == RESULTS / "decode":
        out_path = Path("/tmp") / "moemesh-decode-quick"  # a smoke run never replaces the published results
    results: dict[str, dict] = kept_rows(out_path, keys, notes) if args.update else {}
    for key in keys:
        row = prepare(key, work_dir, log)
        row_load = list(os.getloadavg())
        row_start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        prompt = prompt_ids(key, row, args.prompt_tokens)
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        reads: list[float] = []
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            if not args.quick:
                floor = run_one("floor", row, args, prompt)
                reads += [floor["read_gb_s"]] if "read_gb_s" in floor else []
                log(f"{key} round {r + 1}/{args.rounds} read floor: {floor.get('read_gb_s', floor.get('error'))} GB/s")
            for e in order:
                res = run_one(e, row, args, prompt)
                runs[e].append(res)
                what = res.get("error", "").strip().splitlines()[-1:] if "error" in res else \
                    [f"decode {res['decode_tok_s']:.1f} tok/s, prefill {res['prefill_tok_s']:.0f} tok/s, "
                     f"load {res['load_s']:.1f} s, first token {res['first_token_s']:.1f} s"]
                log(f"{key} round {r + 1}/{args.rounds} {e}: {' '.join(what)}")
        out = {e: summary(rs) for e, rs in runs.items()}
        base = out.get("llama.cpp", {})
        ours = out["moemesh"]
        if base.get("decode_tok_s_median") and ours.get("decode_tok_s_median"):
            out["decode_vs_llama_cpp"] = ours["decode_tok_s_median"] / base["decode_tok_s_median"]
            out["prefill_vs_llama_cpp"] = ours["prefill_tok_s_median"] / base["prefill_tok_s_median"]
        nbytes = [r["bytes_per_token"] for r in runs["moemesh"] if "bytes_per_token" in r]
        if reads and nbytes:  # the physical floor: decode_floor.py
            out["floor"] = {"read_gb_s_median": statistics.median(reads), "read_gb_s_all": reads,
                            "bytes_per_token": nbytes[0], "tok_s": statistics.median(reads) * 1e9 / nbytes[0]}
        out.update(title=TITLES.get(key) or _synth_title(key), layers=row["layers"], quant=row["quant"],
                   model=row["moemesh"], gguf=row["gguf"], measured_at=row_start,
                   loadavg=[row_load[0], os.getloadavg()[0]], command=" ".join(sys.argv))
        results[key] = out
    payload = {"rows": results, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
               "decode_tokens": args.decode_tokens, "warmup": args.warmup, "threads": args.threads,
               "omp_wait_policy": args.omp_wait_policy, "quick": args.quick, "loadavg_before": load_before,
               "loadavg_after": list(os.getloadavg()), "notes": notes}
    results = {k: results[k] for k in ROWS if k in results}  # the table's order, kept rows included
    write_results(out_path.parent, out_path.name, payload, markdown(payload), sys.argv)
    print(markdown(payload))
    if not args.quick:
        subprocess.run([sys.executable, str(HERE / "readme_table.py")], check=False, stdout=subprocess.DEVNULL)
    return 0


def kept_rows(out_path: Path, keys: list[str], notes: list[str]) -> dict[str, dict]:
    """--update: the rows of the existing results that this run does not remeasure, as they were."""
    path = out_path.with_suffix(".json")
    old = json.loads(path.read_text()).get("rows", {}) if path.is_file() else {}
    kept = {k: r for k, r in old.items() if k not in keys}
    if kept:
        notes.append(f"rows kept from an earlier run (see each row's time and load): {', '.join(kept)}")
    return kept


def _synth_title(key: str) -> str:
    from moemesh.benchkit.synth.configs import TITLES as SYNTH

    return f"{SYNTH[key]} shapes"


if __name__ == "__main__":
    sys.exit(main())
