"""Perplexity of moefied SmolLM2 vs the dense model, on held-out text, for several (experts, top-k).

The dense baseline is the same dequantized fp32 weights the MoE is split from (``--quant fp32``);
every MoE is made by ``moefy`` (calibrated on moemesh/moefy/data, never on the eval text) and run
by moemesh in fp32. Text: tests/data/kv_eval_essay.txt, tokenized once, scored in windows of
``--window`` tokens (each window starts with BOS; every token after the first is predicted).
Each row also asks the chat question "What is the capital of France?" (greedy, 24 tokens).

    .venv/bin/python bench/moefy_ppl.py [--configs 16/8,16/12,...] [--append] -> bench/results/moefy_ppl.{json,md}
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from moemesh.batch import BatchLayout
from moemesh.benchkit.results import write_results
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.moefy.pipeline import MoefyOptions, moefy

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


def perplexity(model, ids: list[int], window: int, bos: int | None) -> tuple[float, int]:
    nll, n = 0.0, 0
    for start in range(0, len(ids), window - 1):
        chunk = ([bos] if bos is not None else []) + ids[start : start + window - 1]
        if len(chunk) < 2:
            break
        cache = model.new_cache()
        cache.add_sequence(0)
        logits = model(torch.tensor(chunk), torch.arange(len(chunk)), cache, BatchLayout([0], [len(chunk)]), all_logits=True)
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [T-1, V]
        target = torch.tensor(chunk[1:])
        nll -= logp.gather(1, target[:, None]).sum().item()
        n += len(chunk) - 1
    return math.exp(nll / n), n


def answer(loaded) -> str:
    tok = loaded.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}]), add_special_tokens=False)
    seq = Engine(loaded.model, stop_token_ids=tok.eos_token_ids).generate([ids], SamplingParams(temperature=0.0, max_tokens=24))[0]
    return tok.decode([t for t in seq.output_ids if t not in tok.eos_token_ids]).strip()


def evaluate(path: str, ids: list[int], window: int) -> dict:
    loaded = load_model(path, "fp32")
    t0 = time.perf_counter()
    ppl, n = perplexity(loaded.model, ids, window, loaded.tokenizer.bos_token_id)
    return {"ppl": ppl, "tokens": n, "eval_seconds": time.perf_counter() - t0, "answer": answer(loaded)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", default="16/8,16/12,32/16,32/24,16/4,16/16,16/8@1.0",
                    help="EXPERTS/TOPK[@ROUTER_SCALE] list")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--work-dir", default="/tmp/moefy_bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/moefy_ppl"))
    ap.add_argument("--append", action="store_true", help="keep the rows already in OUT.json, run only new configs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dense = load_model(a.model, "fp32")
    text = (ROOT / "tests/data/kv_eval_essay.txt").read_text(encoding="utf-8")
    ids = dense.tokenizer.encode(text, add_special_tokens=False)
    del dense
    old = Path(a.out + ".json")
    if a.append and old.is_file():
        rows = json.loads(old.read_text())["rows"]
        a.configs = ",".join([r["config"] for r in rows[1:]] + [c for c in a.configs.split(",") if c not in {r["config"] for r in rows}])
    else:
        rows = [{"config": "dense", "experts": None, "top_k": None, "router_scale": None, **evaluate(a.model, ids, a.window)}]
        print(rows[-1])
    for spec in a.configs.split(","):
        if any(r["config"] == spec for r in rows):
            continue
        shape, _, scale = spec.partition("@")
        e, k = (int(v) for v in shape.split("/"))
        opts = MoefyOptions(experts=e, top_k=k, **({"router_scale": float(scale)} if scale else {}))
        out = work / f"moe-{e}x{k}-{opts.router_scale}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        moefy(a.model, out, opts, progress=False)
        moefy_s = time.perf_counter() - t0
        report = json.loads((out / "moefy.json").read_text())
        row = {"config": spec, "experts": e, "top_k": k, "router_scale": opts.router_scale, "moefy_seconds": moefy_s,
               "router_error": report["mean_router_error"], "oracle_error": report["mean_oracle_error"],
               **evaluate(str(out), ids, a.window)}
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(row)
        write(a, rows)  # after every row: a long run leaves partial results


def write(a, rows: list[dict]) -> None:
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_vs_dense"] = r["ppl"] / base
    meta = {"model": a.model, "eval_text": "tests/data/kv_eval_essay.txt", "eval_tokens": rows[0]["tokens"],
            "window": a.window, "threads": a.threads, "machine": platform.machine(), "cpus": os.cpu_count(),
            "command": f"python bench/moefy_ppl.py --configs {a.configs}"}
    lines = [f"# MoEfied {a.model}: perplexity on held-out text", "",
             f"Eval: {meta['eval_text']} ({meta['eval_tokens']} predicted tokens, windows of {a.window}); "
             f"dense = the same dequantized fp32 weights. Calibration: moemesh/moefy/data (not the eval text). "
             f"Router error: mean over layers of ||FFN - picked experts|| / ||FFN|| on held-out calibration "
             f"tokens (oracle: the best possible top-k).", "", f"Command: `{meta['command']}`", "",
             "| config | experts | top-k | active FFN | router scale | ppl | vs dense | router err | oracle err | moefy s | answer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        active = "100%" if r["experts"] is None else f"{100 * r['top_k'] / r['experts']:.0f}%"
        opt = (lambda key, f: "" if r.get(key) is None else f.format(r[key]))  # noqa: E731
        lines.append(f"| {r['config']} | {opt('experts', '{}')} | {opt('top_k', '{}')} | {active} | "
                     f"{opt('router_scale', '{:g}')} | {r['ppl']:.2f} | {r['ppl_vs_dense']:.3f} | "
                     f"{opt('router_error', '{:.3f}')} | {opt('oracle_error', '{:.3f}')} | {opt('moefy_seconds', '{:.0f}')} | "
                     f"{' '.join(r['answer'][:60].split()).replace('|', '/')} |")
    out = Path(a.out)
    write_results(out.parent, out.name, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n", sys.argv)


if __name__ == "__main__":
    main()
