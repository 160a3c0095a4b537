"""Is a machine probe (benchkit/probe.py) about THIS machine, and recent? A probe shipped from another
machine (or measured months ago) made `plan` predict 22.3 tok/s where 60.2 was measured; a probe now
records the machine it measured (cpu model, cores, the disk device under its read file, kernel) and
``stale_reason`` compares it with the machine here: `plan` refuses the tok/s prediction with the reason,
the benchmarks re-run the probe (``probe_for``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .machine_id import machine_identity

MAX_AGE_DAYS = 30.0
IDENTITY_KEYS = ("cpu_model", "cores", "disk_device", "kernel")


def stale_reason(probe: dict[str, Any], here: dict[str, Any] | None = None, now: float | None = None,
                 max_age_days: float = MAX_AGE_DAYS) -> str | None:
    """Why ``probe`` cannot stand for this machine today (None: it can)."""
    ident = (probe.get("machine") or {}).get("identity")
    if not ident:
        return "the probe records no machine identity (measured before probes did, or elsewhere): re-run it"
    if here is None:
        read = Path((probe.get("disk") or {}).get("file") or "/nonexistent").parent  # the disk the probe read
        here = machine_identity(read if read.exists() else None)
    diff = [f"{k} {ident.get(k)!r} there, {here.get(k)!r} here" for k in IDENTITY_KEYS if ident.get(k) != here.get(k)]
    if diff:
        return "the probe was measured on another machine (" + "; ".join(diff) + ")"
    try:
        taken = time.mktime(time.strptime(probe["date"], "%Y-%m-%d %H:%M:%S"))
    except (KeyError, ValueError):
        return "the probe has no readable date"
    age = ((now if now is not None else time.time()) - taken) / 86400
    if age > max_age_days:
        return f"the probe is {age:.0f} days old (more than {max_age_days:g})"
    return None


def probe_for(path: Path | None = None, log: Callable[[str], None] = print, max_age_days: float = MAX_AGE_DAYS,
              quick: bool = True) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The probe at ``path`` (default: the user's) if it is this machine's and recent, else a fresh one
    measured now (``moemesh bench --quick``'s probe) and saved there. Returns (probe, what happened)."""
    from . import probe as probe_mod

    path = path or probe_mod.default_path()
    old = probe_mod.load(path)
    why = "no probe saved" if old is None else stale_reason(old, max_age_days=max_age_days)
    if why is None:
        return old, {"path": str(path), "date": old["date"], "rerun": False}
    log(f"machine probe {path}: {why}; measuring it again (~1 min)")
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    spec = {"disk_file": None, "disk_dir": str(path.parent), "threads": 2, "quick": quick}
    proc = subprocess.run([sys.executable, "-m", "moemesh.benchkit.probe_main", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    fresh = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if fresh is None:
        return None, {"path": str(path), "rerun": True, "why": why, "error": f"probe failed (exit {proc.returncode})"}
    probe_mod.save(fresh, path)
    return fresh, {"path": str(path), "date": fresh["date"], "rerun": True, "why": why}
