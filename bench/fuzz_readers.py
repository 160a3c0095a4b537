"""Reader fuzzing figures for the README (issue 20 item 2): runs tests/test_fuzz_*.py with N cases per
property and sums how the cases ended per reader (accepted, or refused with the reader's own error;
anything else fails the run). Results: bench/results/fuzz_readers.{json,md}.

    .venv/bin/python bench/fuzz_readers.py              # 2000 cases per property
    .venv/bin/python bench/fuzz_readers.py --quick      # 60 per property (the default test suite's bound)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from moemesh.benchkit.results import command_string, write_results

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_fuzz_gguf.py", "tests/test_fuzz_safetensors.py", "tests/test_fuzz_store.py",
         "tests/test_fuzz_mesh_parsers.py"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2000, help="cases per property (default 2000)")
    p.add_argument("--quick", action="store_true", help="60 cases per property, written as fuzz_readers_quick")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    examples = 60 if args.quick else args.examples
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "fuzz.jsonl"
        env = {**os.environ, "FUZZ_EXAMPLES": str(examples), "MOEMESH_FUZZ_REPORT": str(report),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *TESTS],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    readers: dict[str, dict] = {}
    for row in rows:
        agg = readers.setdefault(row["reader"], {"cases": 0, "outcomes": Counter(), "seconds": 0.0})
        agg["cases"] += row["cases"]
        agg["outcomes"].update(row["outcomes"])
        agg["seconds"] += row["seconds"]
    payload = {"examples_per_property": examples, "passed": r.returncode == 0,
               "readers": {k: {**v, "outcomes": dict(v["outcomes"])} for k, v in readers.items()},
               "pytest_tail": r.stdout[-2000:]}
    md = ["# Reader fuzzing", "", f"`{command_string(sys.argv)}`: {examples} cases per property, "
          f"{'all passed' if r.returncode == 0 else 'FAILED'}", "",
          "| reader | cases | accepted | refused with its own error | seconds |", "|---|---|---|---|---|"]
    for name, v in readers.items():
        refused = ", ".join(f"{k} {n}" for k, n in sorted(v["outcomes"].items()) if k != "ok")
        md.append(f"| {name} | {v['cases']} | {v['outcomes'].get('ok', 0)} | {refused} | {v['seconds']:.0f} |")
    text = "\n".join(md) + "\n"
    write_results(args.out, "fuzz_readers_quick" if args.quick else "fuzz_readers", payload, text, sys.argv)
    print(text if r.returncode == 0 else r.stdout[-4000:])
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
