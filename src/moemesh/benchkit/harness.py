"""`moemesh bench run`: run bench/ suites (benchkit/suites.py) as subprocesses of this interpreter.

Requirements (llama.cpp, root + cgroups) are checked for every selected suite before the first
one starts, so a long `run all` does not fail an hour in. Each suite prints its command, its
elapsed time and the result files it wrote (files under bench/results/ whose mtime changed); a
failing suite does not stop the rest (unless stop_on_error), and the summary names it.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoemeshError
from .suites import DEFAULT_LLAMA_PYTHON, SUITES, Suite


def default_llama_python() -> str:
    return os.environ.get("MOEMESH_LLAMA_PYTHON") or DEFAULT_LLAMA_PYTHON


def default_work_dir() -> Path:
    return Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "bench"


def find_bench_dir(given: str | None) -> Path:
    """--bench-dir, else bench/ of the source checkout this package runs from (src/moemesh/../../bench)."""
    if given:
        d = Path(given).expanduser()
        if not d.is_dir():
            raise MoemeshError(f"--bench-dir {given}: no such directory")
        return d.resolve()
    import moemesh

    d = Path(moemesh.__file__).resolve().parents[2] / "bench"
    if not d.is_dir():
        raise MoemeshError(f"no bench/ directory at {d}: `moemesh bench run` runs the scripts of a source checkout "
                           "(this moemesh is installed without its repository); pass --bench-dir DIR")
    return d


def llama_cpp_problem(python: str) -> str | None:
    """Why llama-cpp-python cannot be used from ``python``, or None when it imports."""
    if not Path(python).is_file():
        return f"no Python at {python} (pass --llama-python or set MOEMESH_LLAMA_PYTHON)"
    try:
        r = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} failed: {exc}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import llama_cpp ({last})"
    return None


def root_problem() -> str | None:
    from .runner import available

    return None if available() else "needs root and the cgroup-v1 memory controller (/sys/fs/cgroup/memory)"


def unmet(suites: tuple[Suite, ...], llama_python: str) -> dict[str, str]:
    """suite name -> what it needs and why this machine lacks it (each check runs once)."""
    llama = llama_cpp_problem(llama_python) if any(s.llama_cpp for s in suites) else None
    root = root_problem() if any(s.root for s in suites) else None
    out = {}
    for s in suites:
        why = ([f"llama.cpp: {llama}"] if s.llama_cpp and llama else []) + ([f"root: {root}"] if s.root and root else [])
        if why:
            out[s.name] = "; ".join(why)
    return out


@dataclass(frozen=True)
class Options:
    bench_dir: Path
    llama_python: str
    work_dir: Path
    extra: tuple[str, ...] = ()  # appended to every suite's arguments (argparse: the last value wins)
    dry_run: bool = False
    stop_on_error: bool = False
    skip_unavailable: bool = False


def _fill(arg: str, o: Options) -> str:
    return arg.replace("{llama_python}", o.llama_python).replace("{work_dir}", str(o.work_dir))


def command(s: Suite, o: Options) -> list[str]:
    """The suite's argv: this interpreter, the script relative to the checkout root (the cwd)."""
    args = [_fill(a, o) for a in s.args]
    if s.llama_flag and o.llama_python != DEFAULT_LLAMA_PYTHON:
        args += [s.llama_flag, o.llama_python]
    return [sys.executable, str(Path(o.bench_dir.name) / s.script), *args, *o.extra]


def setup_command(s: Suite, o: Options) -> list[str] | None:
    """`python -m moemesh.cli ...` making the suite's prerequisite, or None when it exists already."""
    if s.setup is None or Path(_fill(s.setup.creates, o)).exists():
        return None
    return [sys.executable, "-m", "moemesh.cli", *(_fill(a, o) for a in s.setup.argv)]


def _shown(cmd: list[str], env: tuple[tuple[str, str], ...] = ()) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env] + [shlex.join(cmd)])


def _snapshot(o: Options, s: Suite) -> dict[Path, int]:
    paths = [p for p in (o.bench_dir / "results").glob("*") if p.is_file()] + [o.bench_dir / r for r in s.results]
    return {p.resolve(): p.stat().st_mtime_ns for p in paths if p.is_file()}


def _written(before: dict[Path, int], o: Options, s: Suite) -> list[str]:
    after = _snapshot(o, s)
    return sorted(os.path.relpath(p, o.bench_dir) for p, t in after.items() if before.get(p) != t)


def fmt_seconds(t: float) -> str:
    if t < 60:
        return f"{t:.1f} s"
    m, sec = divmod(int(round(t)), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "exit N", "skipped: ...", "not run"
    seconds: float = 0.0
    wrote: list[str] = field(default_factory=list)
    failed: bool = False


def _run_one(s: Suite, o: Options, i: int, n: int, say: Callable[[str], None]) -> Outcome:
    cwd, env = o.bench_dir.parent, {**os.environ, "PYTHONUNBUFFERED": "1", **dict(s.env)}
    t0, before = time.monotonic(), _snapshot(o, s)
    setup = setup_command(s, o)
    if setup:
        say(f"==> [{i}/{n}] {s.name}: setup: {_shown(setup)}")
        rc = subprocess.run(setup, cwd=cwd, env=env).returncode
        if rc != 0:
            say(f"<== {s.name}: setup failed (exit {rc}) after {fmt_seconds(time.monotonic() - t0)}")
            return Outcome(s.name, f"setup exit {rc}", time.monotonic() - t0, failed=True)
    cmd = command(s, o)
    say(f"==> [{i}/{n}] {s.name}: {_shown(cmd, s.env)}")
    rc = subprocess.run(cmd, cwd=cwd, env=env).returncode
    dt, wrote = time.monotonic() - t0, _written(before, o, s)
    missing = [r for r in s.results if os.path.normpath(r) not in wrote]
    say(f"<== {s.name}: exit {rc} in {fmt_seconds(dt)}; wrote {', '.join(wrote) or 'nothing'}"
        + (f"; not rewritten: {', '.join(missing)}" if missing and rc == 0 else ""))
    return Outcome(s.name, "ok" if rc == 0 else f"exit {rc}", dt, wrote, failed=rc != 0)


def run(suites: tuple[Suite, ...], o: Options, say: Callable[[str], None] = lambda m: print(m, flush=True)) -> int:
    """Run (or with dry_run, print) the suites in order; 0 when every suite that ran exited 0, else 1."""
    lost = [s for s in suites if not (o.bench_dir / s.script).is_file()]
    if lost:
        raise MoemeshError(f"{o.bench_dir} lacks {', '.join(s.script for s in lost)} "
                           f"(suites {', '.join(s.name for s in lost)}); pass --bench-dir")
    missing = unmet(suites, o.llama_python)
    if o.dry_run:
        for i, s in enumerate(suites, 1):
            setup = setup_command(s, o)
            say(f"[{i}/{len(suites)}] {s.name} (~{s.minutes:g} min): "
                + (f"{_shown(setup)} && " if setup else "") + _shown(command(s, o), s.env))
            if s.name in missing:
                say(f"    cannot run here: {missing[s.name]}")
        say(f"(dry run; cwd {o.bench_dir.parent}; ~{fmt_seconds(60 * sum(s.minutes for s in suites))} in all)")
        return 0
    if missing and not o.skip_unavailable:
        raise MoemeshError("missing requirements (nothing was run; --skip-unavailable runs the others):\n"
                           + "\n".join(f"  {name} needs {why}" for name, why in missing.items()))
    outcomes: list[Outcome] = []
    for i, s in enumerate(suites, 1):
        if s.name in missing:
            say(f"--- [{i}/{len(suites)}] {s.name}: skipped, needs {missing[s.name]}")
            outcomes.append(Outcome(s.name, f"skipped ({s.needs})"))
        elif o.stop_on_error and any(x.failed for x in outcomes):
            outcomes.append(Outcome(s.name, "not run"))
        else:
            outcomes.append(_run_one(s, o, i, len(suites), say))
    say(summary(outcomes))
    return 1 if any(x.failed for x in outcomes) else 0


def summary(outcomes: list[Outcome]) -> str:
    w = max(len("suite"), *(len(x.name) for x in outcomes))
    lines = ["", "summary:", f"{'suite':<{w}}  {'status':<22} {'time':>8}  wrote"]
    lines += [f"{x.name:<{w}}  {x.status:<22} {fmt_seconds(x.seconds) if x.seconds else '-':>8}  {', '.join(x.wrote) or '-'}"
              for x in outcomes]
    failed = [f"{x.name} ({x.status})" for x in outcomes if x.failed]
    lines.append(f"{len(failed)} of {len(outcomes)} suites failed: {', '.join(failed)}" if failed
                 else f"{sum(x.status == 'ok' for x in outcomes)} of {len(outcomes)} suites ran, none failed")
    return "\n".join(lines)


def suite_table() -> str:
    """`moemesh bench --list`: every suite with its rough time, needs and whether `all` runs it."""
    w, wn = max(len(s.name) for s in SUITES), max(len(s.needs) for s in SUITES)
    lines = [f"{'suite':<{w}}  {'time':>8}  {'needs':<{wn}}  {'all':<3}  what"]
    for s in SUITES:
        what = s.what + (f" [{s.note}]" if s.note else "")
        lines.append(f"{s.name:<{w}}  {f'~{s.minutes:g} min':>8}  {s.needs:<{wn}}  {'yes' if s.in_all else 'no':<3}  {what}")
    total = fmt_seconds(60 * sum(s.minutes for s in SUITES if s.in_all))
    lines += ["", "`moemesh bench run SUITE [SUITE ...] [--dry-run] [-- ARGS]` runs bench/SCRIPT with the documented "
              f"arguments (ARGS appended); `run all` runs the suites marked yes in this order (~{total})."]
    return "\n".join(lines)
