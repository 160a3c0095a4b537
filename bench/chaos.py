"""Chaos: kill -9, SIGSTOP/SIGCONT and restarts of the nodes of a 3-node loopback mesh under load
(issue 20 item 5; moemesh.mesh.chaos). Every request must complete with the one-process answer or
fail with the API's error body; none may hang, none may differ. Results: bench/results/chaos.{json,md}.

    .venv/bin/python bench/chaos.py                  # 10 minutes
    .venv/bin/python bench/chaos.py --duration 120   # what the results in the README used
    .venv/bin/python bench/chaos.py --quick          # 45 s, results to chaos_quick.{json,md}
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from moemesh.benchkit.chat_moe import build_chat_moe_store
from moemesh.benchkit.results import command_string, write_results
from moemesh.mesh.chaos import ChaosConfig, markdown, run_chaos

RESULTS = Path(__file__).resolve().parent / "results"


def chat_moe_hf(work_dir: str) -> str:
    """A 4-layer random qwen3_moe (8 experts) with SmolLM2's tokenizer, as an HF directory."""
    build_chat_moe_store(work_dir, hidden=32, layers=4, experts=8, moe_intermediate=24, seed=7)
    return str(Path(work_dir) / "hf")


def run(cfg: ChaosConfig) -> dict:
    return run_chaos(cfg).summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load under chaos (default 600)")
    p.add_argument("--quick", action="store_true", help="45 s, written as chaos_quick.{json,md}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="concurrent clients (default 2)")
    p.add_argument("--model", default=None, help="an HF checkpoint directory with a tokenizer (default: a tiny chat MoE)")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "moemesh-chaos"))
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args(argv)
    cfg = ChaosConfig(model=args.model or chat_moe_hf(args.work_dir), duration=45.0 if args.quick else args.duration,
                      seed=args.seed, workers=args.workers)
    summary = run(cfg)
    payload = {"config": {k: v for k, v in cfg.__dict__.items() if k != "secret"}, **summary}
    md = markdown(summary, command_string(sys.argv))
    write_results(args.out, "chaos_quick" if args.quick else "chaos", payload, md, sys.argv)
    print(md)
    o = summary["outcomes"]
    return 0 if o["hung"] == o["wrong"] == o["unclear"] == 0 and o["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
