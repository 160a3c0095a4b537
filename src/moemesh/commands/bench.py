"""``moemesh bench``: probe this machine (disk, memory, matmul rates) for ``moemesh plan``.

The probe is saved as JSON (default ~/.cache/moemesh/probe.json, or $MOEMESH_CACHE/probe.json).
The compute part runs in a child process with OMP_WAIT_POLICY=PASSIVE, as the benchmarks run
the engines: spinning OpenMP threads collapse 2-thread matmuls on a shared machine. Whole-model
comparisons (lazy experts vs llama.cpp under memory caps, the plan check) live in bench/ and run
through ``moemesh bench run SUITE|all`` (benchkit/harness.py; ``--list`` shows the suites).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import MoemeshError


class _SuiteArgsParser(argparse.ArgumentParser):
    """`bench run` keeps the words after `--` for the benchmark scripts: plain argparse would fold
    them into the SUITE list (it drops the `--` and matches them as positionals)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        extra: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, extra = args[:i], args[i + 1:]
        ns, rest = super().parse_known_args(args, namespace)
        ns.extra = extra
        return ns, rest


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure this machine for `moemesh plan`; run the bench/ suites",
                       description="Without a subcommand: the machine probe `moemesh plan` reads. "
                                   "`moemesh bench --list` and `moemesh bench run SUITE|all`: the benchmarks of bench/.")
    p.add_argument("--quick", action="store_true", help="shorter samples and a smaller disk test file (~1 min)")
    p.add_argument("--out", help="probe JSON path (default: where `moemesh plan` looks)")
    p.add_argument("--disk-file", help="read this existing large file for the disk test (e.g. a store's experts.bin)")
    p.add_argument("--disk-dir", help="write the disk test's scratch file here (default: next to --out)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="compute threads (default 2)")
    p.add_argument("--list", action="store_true", help="list the benchmark suites of bench/ and exit")
    p.set_defaults(func=run, bench_command=None)
    bsub = p.add_subparsers(title="benchmark suites", dest="bench_command", metavar="run",
                            parser_class=_SuiteArgsParser)
    r = bsub.add_parser("run", help="run benchmark suites of bench/ (`all`: the documented full sequence)",
                        usage="moemesh bench run SUITE [SUITE ...] [options] [-- ARGS for every suite's script]")
    r.add_argument("suites", nargs="+", metavar="SUITE", help="suite names (`moemesh bench --list`) or `all`")
    r.add_argument("--dry-run", action="store_true", help="print the commands and unmet requirements, run nothing")
    r.add_argument("--stop-on-error", action="store_true", help="stop at the first failing suite")
    r.add_argument("--skip-unavailable", action="store_true",
                   help="skip suites whose requirements (llama.cpp, root) are missing instead of refusing to start")
    r.add_argument("--bench-dir", help="the bench/ directory (default: the source checkout's)")
    r.add_argument("--llama-python", help="Python with llama-cpp-python (default: $MOEMESH_LLAMA_PYTHON or "
                                          "~/.cache/moemesh/peers/llamacpp-venv/bin/python, built by `make peers`)")
    r.add_argument("--work-dir", help="where prerequisites are made once (default: ~/.cache/moemesh/bench)")
    r.set_defaults(func=run_suites)


def run_suites(args: argparse.Namespace) -> int:
    from ..benchkit import harness, suites

    if args.quick or args.out or args.disk_file or args.disk_dir:
        raise MoemeshError("--quick/--out/--disk-file/--disk-dir are the probe's options, not `bench run`'s")
    if args.extra and "all" in args.suites:
        raise MoemeshError("arguments after `--` go to every suite named; with `all` name the suites instead")
    selected = suites.select(args.suites)
    opts = harness.Options(bench_dir=harness.find_bench_dir(args.bench_dir),
                           llama_python=args.llama_python or harness.default_llama_python(),
                           work_dir=Path(args.work_dir).expanduser() if args.work_dir else harness.default_work_dir(),
                           extra=tuple(args.extra), dry_run=args.dry_run, stop_on_error=args.stop_on_error,
                           skip_unavailable=args.skip_unavailable)
    return harness.run(selected, opts)


def run(args: argparse.Namespace) -> int:
    from ..benchkit import probe

    if args.list:
        from ..benchkit.harness import suite_table

        print(suite_table())
        return 0
    out = Path(args.out) if args.out else probe.default_path()
    if args.disk_file and not Path(args.disk_file).is_file():
        raise MoemeshError(f"--disk-file {args.disk_file}: no such file")
    if args.threads < 1:
        raise MoemeshError("--threads must be at least 1")
    spec = {"disk_file": args.disk_file, "disk_dir": args.disk_dir or str(out.parent), "threads": args.threads,
            "quick": args.quick}
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, "-m", "moemesh.benchkit.probe_main", json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            print(line, flush=True)
    if proc.returncode != 0 or result is None:
        raise MoemeshError(f"the machine probe failed (exit {proc.returncode}); see the messages above")
    probe.save(result, out)
    print(f"saved {out} ({result['seconds']:.0f} s)")
    return 0
