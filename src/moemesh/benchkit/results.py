"""The one results writer of the bench/ scripts: NAME.json + NAME.md, written atomically, with
the machine and the command that made them.

Every benchmark used to grow its own "dump JSON, write markdown, note the load average" lines;
this keeps what bench/readme_table.py and the tests read (a payload's own keys are never
touched: "machine" and "command" are only added when the payload lacks them).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .machine_id import cpu_model
from .probe import total_ram

ROOT = Path(__file__).resolve().parents[3]  # the source checkout (src/moemesh/benchkit -> repo)


def torch_version() -> str | None:
    """torch's version without importing it (a second of CPU) unless it already is."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return str(mod.__version__)
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001  (not installed: a results file still gets written)
        return None


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's commit read from .git's files (no git subprocess: benchmarks run anywhere, git or not)."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None  # detached
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"
        base = (git / common.read_text().strip()).resolve() if common.is_file() else git
        for d in (git, base):
            if (d / ref).is_file():
                return (d / ref).read_text().strip() or None
        for line in (base / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What a benchmark number depends on besides the code: CPU, cores, RAM, torch, load, commit, date."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_bytes": total_ram(), "python": platform.python_version(),
            "torch": torch_version(), "loadavg": list(os.getloadavg()), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def command_string(command: Sequence[str]) -> str:
    """argv -> 'bench/x.py --flag v': the script path relative to the checkout, as the existing
    results' "command" keys are written (the README shows them after `.venv/bin/python`)."""
    parts = [str(c) for c in command]
    if parts:
        try:
            parts[0] = str(Path(parts[0]).resolve().relative_to(ROOT))
        except ValueError:
            pass
    return shlex.join(parts)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory: os.replace is atomic
    try:
        tmp.write_text(text)  # (not mkstemp: its 0600 mode would stick to the results file)
        os.replace(tmp, path)  # readers (readme_table, a concurrent check) never see half a file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_results(results_dir: str | Path, name: str, payload: dict[str, Any], markdown: str,
                  command: Sequence[str]) -> tuple[Path, Path]:
    """Write RESULTS_DIR/NAME.json (payload + "machine" + "command" where absent) and NAME.md;
    returns both paths. The payload itself is not modified."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data.setdefault("machine", machine_info())
    data.setdefault("command", command_string(command))
    js, md = out / f"{name}.json", out / f"{name}.md"
    _atomic_write(js, json.dumps(data, indent=1) + "\n")
    _atomic_write(md, markdown)
    return js, md
