"""SmolLM2-135M prefill and decode speed: moemesh (eager int4, compiled int4, eager fp32) vs
llama.cpp (llama-cpp-python, same GGUF) vs transformers (fp32, same GGUF), interleaved in rounds.

    .venv/bin/python bench/decode.py --llama-python /work/llamacpp-venv/bin/python

Every round runs each engine once on the same ~60-token prompt: prefill (prompt -> logits of the
first token, argmax) then 64 greedy decode steps (EOS ignored). Engines alternate inside a round,
so load from other processes on the shared machine hits them alike; we report medians.
llama.cpp runs in a long-lived subprocess (its own venv) driven over stdin/stdout. Compile
time is measured in fresh subprocesses: cold (empty Inductor cache dir) then warm (same dir).
Writes bench/results/decode.json and bench/results/decode.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moemesh.benchkit.results import cpu_model, write_results

PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a "
    "notebook and a thermos of tea. From the gallery he could see the fishing boats returning, "
    "the gulls settling on the harbour wall and, far out, the dark line where the storm clouds "
    "gathered. He wrote down the wind, the"
)
RESULTS = Path(__file__).parent / "results"

# ---------------------------------------------------------------- llama.cpp worker (its own venv)
LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads = sys.argv[1], int(sys.argv[2])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
            verbose=False)
n_vocab = llm.n_vocab()

def argmax_last():  # logits of the last evaluated token (llm.scores is only filled with logits_all)
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

print(json.dumps({"ready": True, "version": __import__("llama_cpp").__version__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(req["prompt"])
    tok = argmax_last()
    t1 = time.perf_counter()
    toks = [tok]
    for _ in range(req["n"]):
        llm.eval([tok])
        tok = argmax_last()
        toks.append(tok)
    t2 = time.perf_counter()
    print(json.dumps({"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": toks}), flush=True)
"""


class LlamaCpp:
    def __init__(self, python: str, gguf: Path, threads: int) -> None:
        self.proc = subprocess.Popen([python, "-c", LLAMA_WORKER, str(gguf), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError("llama.cpp worker did not start")
        self.version = json.loads(hello)["version"]

    def run(self, prompt: list[int], n: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------- our engines and transformers
def run_moemesh(engine, prompt: list[int], n: int) -> dict:
    from moemesh.engine.sampling_params import SamplingParams

    (seq,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n + 1))
    return {"prefill_s": seq.prefill_seconds, "decode_s": seq.decode_seconds, "tokens": seq.output_ids}


def run_transformers(model, prompt: list[int], n: int) -> dict:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        past, toks = out.past_key_values, [tok]
        for _ in range(n):
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            toks.append(tok)
        t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": toks}


def compile_probe(cache_dir: str, threads: int) -> None:
    """Subprocess entry: load, prefill, time the first compiled decode step (= compile)."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from moemesh.batch import BatchLayout
    from moemesh.engine.compiled import CompiledDecoder
    from moemesh.loading.loader import load_model

    model = load_model("smollm2", "auto").model
    cache = model.new_cache()
    cache.add_sequence(0)
    with torch.inference_mode():
        model(torch.arange(10, 70), torch.arange(60), cache, BatchLayout([0], [60]))
    dec = CompiledDecoder(model, cache_dir=cache_dir)
    t0 = time.perf_counter()
    dec.step(5, cache, 0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec.step(6, cache, 0)
    second = time.perf_counter() - t0
    print(json.dumps({"first_step_s": first, "second_step_s": second,
                      "process_to_first_compiled_step_s": time.perf_counter() - t_start - second}))


def probe(cache_dir: str, threads: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--compile-probe", cache_dir, "--threads", str(threads)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"compile probe failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_busy(window: float) -> float:
    """Fraction of all cores busy over ``window`` seconds (while we sleep: other jobs' load)."""
    def snap():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    t0, i0 = snap()
    time.sleep(window)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_busy: float, timeout: float) -> float:
    """Sleep until the machine is at most ``max_busy`` busy (others' jobs), or ``timeout``
    passed; returns the last busy fraction seen."""
    deadline = time.monotonic() + timeout
    while True:
        busy = cpu_busy(2.0)
        if busy <= max_busy or time.monotonic() > deadline:
            return busy


# ---------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=None, help="python of a venv with llama-cpp-python")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--max-busy", type=float, default=0.3,
                    help="before each round wait until other jobs use at most this fraction of the CPUs")
    ap.add_argument("--quiet-timeout", type=float, default=300.0, help="longest wait for a quiet machine (s)")
    ap.add_argument("--no-compile-time", action="store_true", help="skip the cold/warm compile probes")
    ap.add_argument("--out", default=str(RESULTS / "decode"), help="output path without extension")
    ap.add_argument("--compile-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_probe:
        compile_probe(args.compile_probe, args.threads)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from moemesh.engine.engine import Engine
    from moemesh.loading.loader import load_model
    from moemesh.loading.source import resolve_model_path

    gguf = resolve_model_path("smollm2")
    notes: list[str] = []
    load_avg_start = os.getloadavg()

    compile_times = None
    cache_dir = tempfile.mkdtemp(prefix="moemesh-bench-inductor-")
    if not args.no_compile_time:
        print("compile probe: cold ...", file=sys.stderr, flush=True)
        cold = probe(cache_dir, args.threads)
        print("compile probe: warm ...", file=sys.stderr, flush=True)
        warm = probe(cache_dir, args.threads)
        compile_times = {"cold": cold, "warm": warm}

    auto = load_model("smollm2", "auto")
    fp32 = load_model("smollm2", "fp32")
    prompt = auto.tokenizer.encode(PROMPT, add_special_tokens=False)[: args.prompt_tokens]
    engines = {
        "moemesh eager int4": lambda p, n, e=Engine(auto.model): run_moemesh(e, p, n),
        "moemesh compiled int4": lambda p, n, e=Engine(auto.model, compiled=True): run_moemesh(e, p, n),
        "moemesh eager fp32": lambda p, n, e=Engine(fp32.model): run_moemesh(e, p, n),
    }
    from moemesh.engine.compiled import use_cache_dir

    use_cache_dir(cache_dir)  # the compiled engine starts warm from the probes' cache
    llama = None
    if args.llama_python and Path(args.llama_python).exists():
        try:
            llama = LlamaCpp(args.llama_python, gguf, args.threads)
            engines["llama.cpp"] = llama.run
        except Exception as exc:  # noqa: BLE001
            notes.append(f"llama.cpp skipped: {exc}")
    else:
        notes.append(f"llama.cpp skipped: no --llama-python (given: {args.llama_python!r})")
    hf_version = None
    if not args.no_transformers:
        try:
            import transformers
            from transformers import AutoModelForCausalLM

            hf_version = transformers.__version__
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
            engines["transformers fp32"] = lambda p, n: run_transformers(hf, p, n)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"transformers skipped: {exc}")

    # warm-up (not timed): first compiled step compiles/loads, first calls fault in weights
    warm_compile = time.perf_counter()
    for name, fn in engines.items():
        t0 = time.perf_counter()
        fn(prompt, 4)
        if name == "moemesh compiled int4":
            warm_compile = time.perf_counter() - t0
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    busy_before_round = []
    for r in range(args.rounds):
        busy_before_round.append(wait_quiet(args.max_busy, args.quiet_timeout))
        for name, fn in engines.items():
            runs[name].append(fn(prompt, args.decode_tokens))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {args.decode_tokens / runs[n][-1]['decode_s']:.1f}" for n in engines), file=sys.stderr, flush=True)
    if llama is not None:
        llama.close()
    shutil.rmtree(cache_dir, ignore_errors=True)  # the probes' and this run's compiled artifacts

    ref_tokens = runs["moemesh eager fp32"][0]["tokens"]
    summary = {}
    for name, rs in runs.items():
        dec = [args.decode_tokens / r["decode_s"] for r in rs]
        pre = [len(prompt) / r["prefill_s"] for r in rs]
        toks = rs[0]["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b), min(len(toks), len(ref_tokens)))
        summary[name] = {
            "decode_tok_s_median": statistics.median(dec), "decode_tok_s_all": dec,
            "prefill_tok_s_median": statistics.median(pre), "prefill_tok_s_all": pre,
            "greedy_prefix_equal_to_fp32": same,
        }
    if "llama.cpp" in summary:
        base_d, base_p = summary["llama.cpp"]["decode_tok_s_median"], summary["llama.cpp"]["prefill_tok_s_median"]
        for s in summary.values():
            s["decode_vs_llama_cpp"] = s["decode_tok_s_median"] / base_d
            s["prefill_vs_llama_cpp"] = s["prefill_tok_s_median"] / base_p

    command = "cd /work/main && .venv/bin/python bench/decode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = {
        "command": command,
        "model": str(gguf.name),
        "prompt_tokens": len(prompt),
        "decode_tokens": args.decode_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "max_busy": args.max_busy,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": hf_version,
                    "llama_cpp_python": llama.version if llama else None,
                    "load_avg_start": load_avg_start, "load_avg_end": os.getloadavg()},
        "cpu_busy_before_each_round": busy_before_round,
        "compile_seconds": compile_times,
        "compiled_engine_first_call_s": warm_compile,
        "engines": summary,
        "notes": notes,
    }
    out = Path(args.out)
    write_results(out.parent, out.name, result, markdown(result), sys.argv)
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# SmolLM2-135M decode and prefill speed",
        "",
        f"Command: `{r['command']}`",
        "",
        f"{r['model']}, prompt {r['prompt_tokens']} tokens, {r['decode_tokens']} greedy decode steps (EOS ignored), "
        f"{r['threads']} threads everywhere, {r['rounds']} interleaved rounds, medians. Machine: {r['machine']['cpu']}, "
        f"{r['machine']['cores']} cores shared with other jobs (load average {r['machine']['load_avg_start'][0]:.1f} "
        f"at start, {r['machine']['load_avg_end'][0]:.1f} at end; each round waited for other jobs to use "
        f"<= {r['max_busy']:.0%} of the CPUs, measured before the rounds: "
        f"{', '.join(f'{b:.0%}' for b in r['cpu_busy_before_each_round'])}); torch {r['machine']['torch']}, "
        f"llama-cpp-python {r['machine']['llama_cpp_python']}, transformers {r['machine']['transformers']}.",
        "",
        "| engine | decode tok/s | vs llama.cpp | prefill tok/s | vs llama.cpp | greedy tokens = fp32 (of "
        f"{r['decode_tokens'] + 1}) | decode tok/s per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, s in r["engines"].items():
        lines.append(
            f"| {name} | {s['decode_tok_s_median']:.1f} | {s.get('decode_vs_llama_cpp', float('nan')):.2f}x | "
            f"{s['prefill_tok_s_median']:.0f} | {s.get('prefill_vs_llama_cpp', float('nan')):.2f}x | "
            f"{s['greedy_prefix_equal_to_fp32']} | {', '.join(f'{x:.0f}' for x in s['decode_tok_s_all'])} |")
    c = r["compile_seconds"]
    lines += ["", "Compile (whole decode step, one graph; fresh processes, first compiled step incl. compile):", ""]
    if c:
        lines += [
            f"- cold (empty Inductor cache): {c['cold']['first_step_s']:.1f} s "
            f"(process start to first compiled token {c['cold']['process_to_first_compiled_step_s']:.1f} s)",
            f"- warm (cache on disk): {c['warm']['first_step_s']:.1f} s "
            f"(process start to first compiled token {c['warm']['process_to_first_compiled_step_s']:.1f} s)",
        ]
    lines.append(f"- in the benchmark process (warm cache, after a cold+warm probe): {r['compiled_engine_first_call_s']:.1f} s")
    lines += [
        "",
        "Reading the table: moemesh numbers are the engine's own accounting (`Engine.generate`, sampler "
        "included); prefill is the first step (prompt -> first token), decode the 64 steps after it. The "
        "compiled engine prefills eagerly (the compiled graph is the single-token step), so its prefill "
        "column measures the same code as eager int4. \"greedy tokens = fp32\" counts how many leading "
        "greedy tokens equal moemesh eager fp32's.",
    ]
    if r["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
