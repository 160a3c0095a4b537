"""The int4 kernels' activation precision: two int8 planes (~16-bit, MOEMESH_INT4_ACT=16) vs one (8-bit,
llama.cpp's Q8 activations, MOEMESH_INT4_ACT=8): speed and what it costs in accuracy.

    .venv/bin/python bench/int4_act.py [--threads 2] [--rounds 5] [--decode-rounds 3] [--no-decode]

Three parts, each alternating the two precisions so load from other processes hits both alike:

* matmuls: one int4 matmul per shape (SmolLM2's projections and head, Qwen3-30B-A3B's expert shapes) at
  M = 1 and 64, the 16- and 8-bit builds of the same ISA called in turn on the same weights; medians
  over ``--rounds`` blocks of calls;
* quality: SmolLM2's logits over a 512-token text (the first 8,000 characters of docs/architecture.md)
  with int4 weights (the GGUF's Q4_1 run by the kernel) at each precision, against the same file
  computed in fp32 (``--quant fp32``): relative RMS error of the logits, mean KL(fp32 || int4), top-1
  agreement;
* decode: bench/decode.py's worker (what ``moemesh generate`` runs) on SmolLM2 and on the demo MoE's
  int4 store (when made), a fresh process per run, the precision set by the environment.

Writes bench/results/int4_act.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moemesh.benchkit.results import write_results
from moemesh.quant import int4_native as n4
from moemesh.quant.qlinear import QuantLinear

HERE = Path(__file__).resolve().parent
SHAPES = [("SmolLM2 qkv", 960, 576), ("SmolLM2 o", 576, 576), ("SmolLM2 gate_up", 3072, 576),
          ("SmolLM2 down", 576, 1536), ("SmolLM2 head", 49152, 576), ("Qwen3 expert gate_up", 1536, 2048),
          ("Qwen3 expert down", 2048, 768)]  # (name, N out, K in)


def matmul_rows(isa: str, threads: int, rounds: int) -> list[dict]:
    libs = {bits: n4.load_variant(isa, bits == 8) for bits in (16, 8)}
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, n, k in SHAPES:
        lin = QuantLinear.from_float(torch.randn(n, k, generator=g) * 0.05, None, "int4")
        for m in (1, 64):
            x = torch.randn(m, k, generator=g)
            calls = max(3, int(2e8 / (n * k * m)))  # ~0.2 G multiply-adds per block
            times: dict[int, list[float]] = {16: [], 8: []}
            for _ in range(rounds):
                for bits, lib in libs.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        n4.int4_matmul(lib, x, lin.qweight, lin.int4_scales(), lin.kernel_fmt())
                    times[bits].append((time.perf_counter() - t0) / calls)
            t16, t8 = statistics.median(times[16]), statistics.median(times[8])
            rows.append({"shape": name, "n": n, "k": k, "m": m, "us_16": t16 * 1e6, "us_8": t8 * 1e6,
                         "speedup": t16 / t8, "gmac_s_8": n * k * m / t8 / 1e9})
            print(f"  {name} M={m}: {t16 * 1e6:.1f} -> {t8 * 1e6:.1f} us ({t16 / t8:.2f}x)", flush=True)
    return rows


def quality_rows() -> list[dict]:
    from moemesh.batch import BatchLayout
    from moemesh.loading.loader import load_model
    from moemesh.loading.source import resolve_model_path
    from moemesh.tokenizer.tokenizer import Tokenizer

    text = (HERE.parent / "docs" / "architecture.md").read_text()[:8000]
    ids = Tokenizer.from_gguf(resolve_model_path("smollm2")).encode(text, add_special_tokens=False)[:512]

    def logits(quant: str) -> torch.Tensor:
        model = load_model("smollm2", quant).model
        cache = model.new_cache()
        cache.add_sequence(0)
        return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)

    ref = logits("fp32")  # [T, V]
    lp_ref = ref.log_softmax(-1)
    rows = []
    for bits in (16, 8):
        os.environ[n4.ACT_ENV] = str(bits)  # (read per call)
        y = logits("auto")
        lp = y.log_softmax(-1)
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)  # [T]
        rows.append({"bits": bits, "tokens": len(ids), "rel_rms": ((y - ref).norm() / ref.norm()).item(),
                     "mean_kl": kl.mean().item(), "top1": (y.argmax(-1) == ref.argmax(-1)).float().mean().item()})
        print(f"  act {bits}: {rows[-1]}", flush=True)
    os.environ.pop(n4.ACT_ENV)
    return rows


def decode_rows(threads: int, rounds: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    import decode as dec  # bench/decode.py: its rows, prompt and worker

    models = ["smollm2"] + (["demo"] if (dec.DEMO_DIR / "config.json").is_file() else [])
    out = []
    for key in models:
        row = dec.prepare(key, Path("/work/bench-data"), print)
        prompt = dec.prompt_ids(key, row, 64)
        cfg = {"prompt": prompt, "warmup": 4, "decode": 48, "threads": threads, "model": row["moemesh"],
               "quant": row["quant"]}
        rates: dict[int, list[float]] = {16: [], 8: []}
        for r in range(rounds):
            for bits in ((16, 8) if r % 2 == 0 else (8, 16)):
                env = {**os.environ, n4.ACT_ENV: str(bits)}
                p = subprocess.run([sys.executable, str(HERE / "decode.py"), "--worker", json.dumps(cfg)],
                                   capture_output=True, text=True, env=env, timeout=900)
                line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
                rates[bits].append(json.loads(line[len("RESULT "):])["decode_tok_s"])
        d16, d8 = statistics.median(rates[16]), statistics.median(rates[8])
        out.append({"model": key, "tok_s_16": d16, "tok_s_8": d8, "speedup": d8 / d16, "runs": rates})
        print(f"  {key}: decode {d16:.1f} -> {d8:.1f} tok/s ({d8 / d16:.2f}x)", flush=True)
    return out


def markdown(isa: str, threads: int, mm: list[dict], quality: list[dict], decode: list[dict]) -> str:
    lines = ["# int4 activations: two int8 planes (16-bit) vs one (8-bit)", "",
             f"Build: {isa}; {threads} thread(s); load average {os.getloadavg()[0]:.1f} at the end. The default "
             "is 16 bits; `MOEMESH_INT4_ACT=8` takes one plane (on AVX2 the second plane doubles the multiplies).",
             "",
             "| shape | N | K | M | 16-bit us | 8-bit us | speedup |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['n']} | {r['k']} | {r['m']} | {r['us_16']:.1f} | {r['us_8']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in mm]
    lines += ["", f"SmolLM2 (Q4_1 GGUF, int4 kernel) vs the same file in fp32, {quality[0]['tokens']} tokens:", "",
              "| activations | logits rel. RMS error | mean KL (nats) | top-1 agreement |", "|---|---:|---:|---:|"]
    lines += [f"| {q['bits']}-bit | {q['rel_rms']:.4f} | {q['mean_kl']:.2e} | {q['top1']:.4f} |" for q in quality]
    if decode:
        lines += ["", "Decode (bench/decode.py's worker, 64-token prompt, 48 timed tokens, medians):", "",
                  "| model | 16-bit tok/s | 8-bit tok/s | speedup |", "|---|---:|---:|---:|"]
        lines += [f"| {d['model']} | {d['tok_s_16']:.1f} | {d['tok_s_8']:.1f} | {d['speedup']:.2f}x |" for d in decode]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="alternating timed blocks per matmul shape")
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isa = n4.cpu_isas()[0]
    if n4.load_variant(isa) is None:
        print("the int4 kernels are not built here (no compiler)")
        return 1
    print(f"matmuls ({isa}) ...", flush=True)
    mm = matmul_rows(isa, args.threads, args.rounds)
    print("quality ...", flush=True)
    quality = quality_rows()
    decode = [] if args.no_decode else decode_rows(args.threads, args.decode_rounds)
    payload = {"isa": isa, "threads": args.threads, "matmuls": mm, "quality": quality, "decode": decode}
    js, md = write_results(args.out, "int4_act", payload, markdown(isa, args.threads, mm, quality, decode), sys.argv)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
