"""Where an uncapped decode step of the bench/lazy.py model goes: fused expert kernel calls, the
other int4 matmuls (attention, head), and everything else (norms, rope, attention ops, router,
Python dispatch). All experts resident, weights warm, one process; each timed call is wrapped with
perf_counter (a few microseconds of its own). With ``--compile`` each repeat also times the
compiled decode step (engine/compiled.py: one torch.compile graph, the MoE layers as the
``moemesh::moe_decode`` custom op) on the same tokens, alternating with eager. Writes
bench/results/decode_split.{json,md}.

    .venv/bin/python bench/decode_split.py [--layers 12] [--tokens 60] [--repeats 3] [--compile]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from moemesh.benchkit.results import write_results  # noqa: E402
from moemesh.benchkit.synth import core as synth
from moemesh.quant import int4_experts as n4e  # noqa: E402
from moemesh.quant import int4_native as n4  # noqa: E402


def timed(fn, acc: dict[str, float], key: str):
    def wrapper(*a):
        t = time.perf_counter()
        try:
            return fn(*a)
        finally:
            acc[key] += time.perf_counter() - t
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_split"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from moemesh.batch import BatchLayout
    from moemesh.loading.loader import load_model

    acc = {"experts": 0.0, "matmul": 0.0}
    n4e.experts_ffn_ptrs = timed(n4e.experts_ffn_ptrs, acc, "experts")
    n4e.experts_mix_ptrs = timed(n4e.experts_mix_ptrs, acc, "experts")  # eager: experts + their weighted sum
    n4e.moe_decode_table = timed(n4e.moe_decode_table, acc, "experts")  # eager resident one-token path (and the compiled op)
    n4.int4_matmul = timed(n4.int4_matmul, acc, "matmul")
    root = synth.model_dir(Path(a.work_dir), a.layers, a.vocab, 0)
    lm = load_model(str(root / "store"), "int4")
    decoder = None
    if a.compile:
        from moemesh.engine.compiled import CompiledDecoder

        decoder = CompiledDecoder(lm.model)
    rng = random.Random(1000)
    rows = []
    for rep in range(a.repeats):
        kv = lm.model.new_cache()
        kv.add_sequence(0)
        lay = BatchLayout([0], [1])
        toks = [rng.randrange(3, a.vocab) for _ in range(a.tokens + 5)]
        for i, tok in enumerate(toks):
            if i == 5:
                acc.update(experts=0.0, matmul=0.0)
                t0 = time.perf_counter()
            lm.model(torch.tensor([tok]), torch.tensor([i]), kv, lay)
        step = (time.perf_counter() - t0) / a.tokens
        e, m = acc["experts"] / a.tokens, acc["matmul"] / a.tokens
        rows.append({"ms_per_token": step * 1e3, "experts_ms": e * 1e3, "matmul_ms": m * 1e3,
                     "rest_ms": (step - e - m) * 1e3, "tokens_per_s": 1 / step})
        if decoder is not None:  # the same tokens through the compiled step (first call compiles)
            cc = lm.model.new_cache()
            cc.add_sequence(0)
            for i, tok in enumerate(toks):
                if i == 5:
                    t0 = time.perf_counter()
                decoder.step(tok, cc, 0)
            rows[-1]["compiled_tokens_per_s"] = a.tokens / (time.perf_counter() - t0)
            rows[-1]["compile_s"] = decoder.compile_seconds
        print(f"repeat {rep}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1].items()), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    payload = {"bench": "decode_split", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "layers": a.layers,
               "vocab": a.vocab, "tokens": a.tokens, "threads": a.threads, "repeats": rows, "median": med}
    comp = f"{med['compiled_tokens_per_s']:.1f}" if "compiled_tokens_per_s" in med else "-"
    md = "\n".join([
        f"# Uncapped decode split (Qwen3-30B-A3B shapes, {a.layers} layers, experts resident)", "",
        "| eager ms/token | fused experts | other int4 matmuls | rest (norms, rope, attention ops, router, Python) | "
        "eager tok/s | compiled tok/s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {med['ms_per_token']:.1f} | {med['experts_ms']:.1f} | {med['matmul_ms']:.1f} | {med['rest_ms']:.1f} | "
        f"{med['tokens_per_s']:.1f} | {comp} |", "",
        f"Medians of {a.repeats} repeats of {a.tokens} teacher-forced steps; command: "
        f"`.venv/bin/python bench/decode_split.py {' '.join(sys.argv[1:])}`.", ""])
    out = Path(a.out)
    write_results(out.parent, out.name, payload, md, sys.argv)
    print(md)


if __name__ == "__main__":
    main()
