"""Prefix caching for agents: an agent-like loop of --turns turns over a --prefix-tokens system
prompt (tool descriptions and rules, as coding agents send), time to first token per turn with
the prefix cache and without it, on the embedded MoE demo model (`make run` builds it).

Each turn's prompt is the whole conversation so far (system, every earlier question and the
model's own answers) plus a new question, rendered with the model's chat template, as an agent
resends it. Without the cache every turn prefills everything again; with it, a turn restores what
the previous turns computed (prompt and answer blocks) and prefills only the rest. Both loops run
in this process on the same loaded model, alternating (off/on, then on/off) per round so load
from other processes hits both; greedy, so both loops see the same answers (checked).

    .venv/bin/python bench/prefix.py                 # the full run: 2,000-token prefix, 5 turns, 3 rounds
    .venv/bin/python bench/prefix.py --quick         # a smoke run (~1 min): 300 tokens, 3 turns, 1 round

Goal (issue 21): turns 2-5 at <= 10% of turn 1's time to first token. Writes
bench/results/prefix.{json,md} (--quick: prefix_quick.*).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from moemesh.benchkit.results import write_results
from moemesh.engine.engine import Engine
from moemesh.engine.prefix import open_prefix_cache
from moemesh.engine.sampling_params import SamplingParams
from moemesh.experts.budget import parse_size
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model

RESULTS = Path(__file__).parent / "results"
DEMO = Path.home() / ".cache" / "moemesh" / "smollm2-moe-16x15"
QUESTIONS = [
    "List the Python files under src/ and say which one defines the HTTP server.",
    "Open README.md and summarize what the project does in two sentences.",
    "Which function parses the --ram option? Give its file and name.",
    "Run the unit tests for the tokenizer and report how many passed.",
    "Write a one-line commit message for a fix to the prefix cache's eviction.",
    "What would you check first if the server answered 500 to every request?",
]
TOOLS = ["read_file", "write_file", "list_dir", "grep", "run_shell", "git_diff", "git_commit", "web_fetch",
         "run_tests", "ask_user", "edit_lines", "search_symbols"]


def system_prompt(tok, target: int) -> str:
    """Tool descriptions and rules until the rendered text holds ~target tokens."""
    lines = ["You are a coding agent working in a git repository. Use the tools below; answer briefly.", ""]
    i = 0
    while len(tok.encode("\n".join(lines))) < target:
        name = TOOLS[i % len(TOOLS)]
        lines += [f"## Tool {i + 1}: {name}_{i // len(TOOLS)}",
                  f"Calls `{name}` with a JSON object. Parameters: `path` (string, relative to the repository "
                  f"root), `limit` (integer, at most {50 + i} results), `reason` (string, why you call it). "
                  f"Rule {i + 1}: never call {name} twice with the same arguments; prefer reading a file "
                  "before editing it, keep edits small, and report errors verbatim.", ""]
        i += 1
    return "\n".join(lines)


def agent_loop(loaded, system: str, turns: int, max_tokens: int, kv: str, prefix: bool) -> list[dict]:
    """One conversation of ``turns`` turns on a fresh engine -> per turn: ttft, prompt/cached tokens, answer."""
    tok = loaded.tokenizer
    cache = loaded.model.new_cache(kv)
    pc = open_prefix_cache(cache, None, loaded.budget) if prefix else None
    if prefix and pc is None:
        raise SystemExit("the prefix cache is off for this model/budget (see --ram)")
    engine = Engine(loaded.model, stop_token_ids=frozenset(tok.eos_token_ids), cache=cache, prefix_cache=pc)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    history = [{"role": "system", "content": system}]
    out = []
    for turn in range(turns):
        history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True), add_special_tokens=False)
        t0 = time.perf_counter()
        seq = engine.add_request(ids, params)
        first = None
        while engine.has_work():
            engine.step()
            if first is None and seq.output_ids:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        answer = tok.decode([t for t in seq.output_ids if t not in tok.eos_token_ids])
        history.append({"role": "assistant", "content": answer})
        out.append({"turn": turn + 1, "prompt_tokens": len(ids), "cached_tokens": seq.cached_tokens, "ttft_s": first,
                    "total_s": total, "output_tokens": len(seq.output_ids), "answer": answer})
    if pc is not None:
        out[-1]["prefix_cache"] = pc.summary()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO), help="default: the MoE demo model `make run` builds")
    ap.add_argument("--ram", default="680M", help="as `make run` (lazy experts; the prefix cache gets its share)")
    ap.add_argument("--kv", default="dense")
    ap.add_argument("--quant", default="int4", help="as `make run` (an HF directory: its int4 store, int4 trunk)")
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48, help="answer length cap per turn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="300-token prefix, 3 turns, 8-token answers, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.prefix_tokens, args.turns, args.max_tokens, args.rounds = 300, 3, 8, 1
    if not Path(args.model).exists():
        raise SystemExit(f"{args.model} not found: `make run` builds the demo model (or pass --model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # what `make run` serves: the int4 store made on first use (int4 trunk: 34 MiB, not 220 MiB of fp32, which
    # left the prefix cache 2 MiB of the 680 MiB budget and a 2,000-token prefix nowhere to stay)
    loaded = load_model(args.model, args.quant, experts=ExpertOptions(ram=parse_size(args.ram), prefix_cache=None))
    load_s = time.perf_counter() - t0
    system = system_prompt(loaded.tokenizer, args.prefix_tokens)
    load_before = os.getloadavg()
    runs: dict[str, list[list[dict]]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            runs[mode].append(agent_loop(loaded, system, args.turns, args.max_tokens, args.kv, mode == "on"))
            print(f"round {r + 1} cache {mode}: ttft " + " ".join(f"{t['ttft_s']:.2f}" for t in runs[mode][-1]) + " s",
                  flush=True)
    report = summarize(runs, args, load_s, load_before)
    name = "prefix_quick" if args.quick else "prefix"
    write_results(RESULTS, name, report, markdown(report), sys.argv)
    print(markdown(report))


def summarize(runs: dict, args, load_s: float, load_before) -> dict:
    turns = []
    for i in range(args.turns):
        row = {"turn": i + 1, "prompt_tokens": runs["on"][0][i]["prompt_tokens"],
               "cached_tokens": runs["on"][0][i]["cached_tokens"]}
        for mode in ("off", "on"):
            row[f"ttft_{mode}_s"] = statistics.median(run[i]["ttft_s"] for run in runs[mode])
        turns.append(row)
    first = turns[0]["ttft_on_s"]
    for row in turns:
        row["on_vs_turn1"] = row["ttft_on_s"] / first
    later = [row["on_vs_turn1"] for row in turns[1:]]
    same = all(a["answer"] == b["answer"] for off, on in zip(runs["off"], runs["on"]) for a, b in zip(off, on))
    return {"model": args.model, "ram": args.ram, "kv": args.kv, "prefix_tokens": args.prefix_tokens,
            "turns": args.turns, "max_tokens": args.max_tokens, "rounds": args.rounds, "quick": args.quick,
            "load_s": load_s, "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            "results": turns, "worst_later_turn_vs_turn1": max(later) if later else None,
            "goal_met": bool(later) and max(later) <= 0.10, "same_answers_with_and_without": same,
            "prefix_cache": runs["on"][-1][-1].get("prefix_cache"),
            "raw": {m: [[{k: v for k, v in t.items() if k != "prefix_cache"} for t in run] for run in runs[m]]
                    for m in runs}}


def markdown(report: dict) -> str:
    lines = [
        f"# Prefix cache, agent loop: {report['turns']} turns over a ~{report['prefix_tokens']}-token system "
        f"prompt, {report['max_tokens']}-token answers, KV {report['kv']}, --ram {report['ram']}",
        "",
        f"Model `{report['model']}`; medians of {report['rounds']} round(s), cache off and on alternating in one "
        f"process; load {report['loadavg_before'][0]:.1f} before, {report['loadavg_after'][0]:.1f} after.",
        "",
        "| turn | prompt tokens | restored | TTFT off (s) | TTFT on (s) | on / turn 1 on |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft_off_s']:.3f} | "
                     f"{r['ttft_on_s']:.3f} | {r['on_vs_turn1']:.1%} |")
    worst = report["worst_later_turn_vs_turn1"]
    lines += ["", f"Turns 2-{report['turns']}: worst {worst:.1%} of turn 1's time to first token "
              f"(goal <= 10%: {'met' if report['goal_met'] else 'not met'}); answers identical with and without "
              f"the cache: {report['same_answers_with_and_without']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
