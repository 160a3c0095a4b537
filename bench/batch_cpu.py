"""CPU time per decode step at batch 1 and batch 8 on the engine alone (no HTTP), and an optional
cProfile of the batch-8 steps: the first thing to look at for "8 streams >= 4x one stream"
(issue 21 part 4). CPU time (this process, all threads) rather than wall time, so that other
processes on a shared machine change the figure less. Prints one JSON object.

    .venv/bin/python bench/batch_cpu.py [--model DIR_OR_NAME] [--ram 680M] [--steps 24] [--profile 20] [--quick]

Batch-8 CPU per step / batch-1 CPU per step is the scaling bound: 8 streams reach 8 / that ratio
times one stream's tokens/s when the CPU is the limit (>= 4x needs a ratio <= 2).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import torch

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.experts.budget import parse_size
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model

TOPICS = ["the sea", "a cat", "Paris", "robots", "winter", "coffee", "a lighthouse", "the moon"]
DEMO = "~/.cache/moemesh/smollm2-moe-16x15"


def decode_cpu_ms(engine: Engine, prompts: list[list[int]], steps: int, profile: cProfile.Profile | None = None) -> float:
    """CPU ms per engine step while ``len(prompts)`` sequences decode (their prefill done first)."""
    params = SamplingParams(temperature=0, max_tokens=steps + 16)
    seqs = [engine.add_request(p, params) for p in prompts]
    for s in seqs:
        s.stop_token_ids = frozenset()  # decode the whole budget (ignore_eos)
    for _ in range(4):  # prefill (one chunk each) and the first decode steps
        engine.step()
    c0 = time.process_time()
    if profile is not None:
        profile.enable()
    for _ in range(steps):
        engine.step()
    if profile is not None:
        profile.disable()
    cpu = time.process_time() - c0
    while engine.has_work():
        engine.step()
    return cpu / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEMO, help="default: the MoE demo model `make run` builds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions of a profiled batch-8 run")
    ap.add_argument("--quick", action="store_true", help="8 steps, 1 round")
    ap.add_argument("--ram", help="lazy experts under this budget (e.g. 680M, as `make run` serves); default resident")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 8, 1


    torch.set_num_threads(args.threads)
    experts = None if args.ram is None else ExpertOptions(ram=parse_size(args.ram))
    loaded = load_model(os.path.expanduser(args.model), experts=experts)
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Write a short story about {t}."}]))
               for t in TOPICS]
    engine = Engine(loaded.model, stop_token_ids=frozenset(tok.eos_token_ids), max_batch=8)
    one = [decode_cpu_ms(engine, prompts[:1], args.steps) for _ in range(args.rounds)]
    eight = [decode_cpu_ms(engine, prompts, args.steps) for _ in range(args.rounds)]
    b1, b8 = min(one), min(eight)
    print(json.dumps({"model": args.model, "ram": args.ram, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
                      "batch1_cpu_ms_per_step": round(b1, 2), "batch8_cpu_ms_per_step": round(b8, 2),
                      "ratio": round(b8 / b1, 2), "cpu_bound_speedup_8_streams": round(8 * b1 / b8, 2)}))
    if args.profile:
        prof = cProfile.Profile()
        decode_cpu_ms(engine, prompts, args.steps, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
