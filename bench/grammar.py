"""Structured output's cost per token in moemesh's decode step, on SmolLM2 (embedded GGUF).

Two parts, one process:
- step: the engine's own accounting while SmolLM2 answers every schema of
  tests/data/json_schemas.json under its grammar (greedy, batch of one): per output token, the
  time to compute the grammar's bitmask and advance it (``Sequence.grammar_seconds``), next to
  the whole decode step's time; every answer is checked with jsonschema.
- sampler: ``Sampler.sample`` on one [1, V] row with and without a bitmask (the mask applied,
  and the general path instead of the C greedy one), median of many calls.

    .venv/bin/python bench/grammar.py            # all schemas, 3 rounds
    .venv/bin/python bench/grammar.py --quick    # 2 schemas, 1 round (~1 min)

Writes bench/results/grammar.{json,md} (--quick: grammar_quick.*).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from moemesh.benchkit.results import write_results
from moemesh.engine.constraints import bitmask_words
from moemesh.engine.engine import Engine
from moemesh.engine.sampler import Sampler
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.tokenizer.formats.tool_grammar import response_grammar
from moemesh.tokenizer.grammar import GrammarCompiler

RESULTS = Path(__file__).parent / "results"
SCHEMAS = Path(__file__).parents[1] / "tests" / "data" / "json_schemas.json"


def answer(loaded: Any, compiler: GrammarCompiler, name: str, schema: dict, max_tokens: int) -> dict:
    tok = loaded.tokenizer
    msg = [{"role": "user", "content": f"Write one {name} as JSON following this schema: {json.dumps(schema)}"}]
    ids = tok.encode(tok.apply_chat_template(msg, add_generation_prompt=True))
    grammar = response_grammar(tok, schema, name)
    compiler.check(grammar)
    t0 = time.perf_counter()
    matcher = compiler.matcher(grammar)
    start_s = time.perf_counter() - t0
    engine = Engine(loaded.model, stop_token_ids=frozenset(tok.eos_token_ids))
    seq = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=max_tokens), grammar=matcher)
    while engine.has_work():
        engine.step()
    text = tok.decode(seq.output_ids, skip_special_tokens=True)
    try:
        jsonschema.validate(json.loads(text), schema)
        valid = True
    except (ValueError, jsonschema.ValidationError):
        valid = False
    n = len(seq.output_ids)
    return {"schema": name, "tokens": n, "valid": valid, "finish_reason": seq.finish_reason,
            "matcher_start_ms": start_s * 1e3, "grammar_ms_per_token": seq.grammar_seconds / n * 1e3,
            "decode_ms_per_token": seq.decode_seconds / max(n - 1, 1) * 1e3, "text": text}


def sampler_cost(vocab: int, calls: int) -> dict:
    sampler = Sampler()
    logits = torch.randn(1, vocab)  # [1, V]
    words = bitmask_words(vocab)
    half = torch.full((words,), 0x55555555, dtype=torch.int32)  # [W]: every other token allowed
    params = [SamplingParams(temperature=0)]
    out = {}
    for label, masks in (("plain", None), ("masked", [half])):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            sampler.sample(logits, params, [[]], [[]], [None], masks)
            times.append(time.perf_counter() - t0)
        out[f"{label}_us"] = statistics.median(times) * 1e6
    out["mask_extra_us"] = out["masked_us"] - out["plain_us"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="2 schemas, 1 round")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    schemas = {k: v for k, v in json.loads(SCHEMAS.read_text()).items() if not k.startswith("_")}
    if args.quick:
        schemas = dict(list(schemas.items())[:2])
        args.rounds = 1
    load_before = os.getloadavg()
    loaded = load_model("smollm2")
    t0 = time.perf_counter()
    compiler = GrammarCompiler(loaded.tokenizer, frozenset(loaded.tokenizer.eos_token_ids))
    setup_s = time.perf_counter() - t0
    runs = []
    for r in range(args.rounds):
        for name, case in schemas.items():
            row = answer(loaded, compiler, name, case["schema"], args.max_tokens)
            row["round"] = r + 1
            runs.append(row)
            print(f"{name}: {row['tokens']} tokens, grammar {row['grammar_ms_per_token']:.3f} ms/token, "
                  f"decode {row['decode_ms_per_token']:.1f} ms/token, valid {row['valid']}", flush=True)
    report = {"model": "smollm2", "vocab": loaded.tokenizer.vocab_size, "rounds": args.rounds, "quick": args.quick,
              "compiler_setup_s": setup_s, "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
              "runs": runs, "sampler": sampler_cost(loaded.tokenizer.vocab_size, 50 if args.quick else 300)}
    per_schema = {}
    for name in schemas:
        rows = [r for r in runs if r["schema"] == name]
        per_schema[name] = {k: statistics.median(r[k] for r in rows) for k in
                            ("tokens", "grammar_ms_per_token", "decode_ms_per_token", "matcher_start_ms")}
        per_schema[name]["valid"] = all(r["valid"] for r in rows)
    report["per_schema"] = per_schema
    total_tokens = sum(r["tokens"] for r in runs)
    report["grammar_ms_per_token"] = sum(r["grammar_ms_per_token"] * r["tokens"] for r in runs) / total_tokens
    report["decode_ms_per_token"] = statistics.median(r["decode_ms_per_token"] for r in runs)
    report["all_valid"] = all(r["valid"] for r in runs)
    name = "grammar_quick" if args.quick else "grammar"
    write_results(RESULTS, name, report, markdown(report), sys.argv)
    print(markdown(report))


def markdown(report: dict) -> str:
    s = report["sampler"]
    overhead = report["grammar_ms_per_token"] + s["mask_extra_us"] / 1e3
    lines = [f"# Structured output: cost per token on SmolLM2 ({report['vocab']}-token vocabulary, llguidance)", "",
             f"Greedy, batch of one, {report['rounds']} round(s); load {report['loadavg_before'][0]:.1f} before, "
             f"{report['loadavg_after'][0]:.1f} after. Vocabulary made ready for grammars once: "
             f"{report['compiler_setup_s']:.2f} s.", "",
             "| schema | tokens | matcher start (ms) | bitmask + advance (ms/token) | decode step (ms/token) | valid |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in report["per_schema"].items():
        lines.append(f"| {name} | {r['tokens']:.0f} | {r['matcher_start_ms']:.2f} | {r['grammar_ms_per_token']:.3f} | "
                     f"{r['decode_ms_per_token']:.1f} | {r['valid']} |")
    lines += ["", f"Sampler on one row: {s['plain_us']:.0f} us plain (C greedy), {s['masked_us']:.0f} us with a "
              f"bitmask (+{s['mask_extra_us']:.0f} us).", "",
              f"Overhead per token: {report['grammar_ms_per_token']:.3f} ms (bitmask + advance, token-weighted mean) "
              f"+ {s['mask_extra_us'] / 1e3:.3f} ms (sampler) = {overhead:.3f} ms, against a median decode step of "
              f"{report['decode_ms_per_token']:.1f} ms ({overhead / report['decode_ms_per_token']:.1%}). "
              f"Every answer valid: {report['all_valid']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
