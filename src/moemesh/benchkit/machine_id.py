"""Which machine this is, as a probe records it (benchkit/probe_check.py compares them): cpu model,
cores, the block device under a path, kernel, host name."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often just 'x86_64')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def disk_device(path: Path | None = None) -> str:
    """The block device holding ``path`` (default: the home directory): its sysfs name and model."""
    st = os.stat(path or Path.home())
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    dev = Path(f"/sys/dev/block/{major}:{minor}")
    try:
        name = dev.resolve().name
        model = ""
        for p in (dev / "device" / "model", dev.resolve().parent / "device" / "model"):
            if p.is_file():
                model = p.read_text().strip()
                break
        return f"{name} {model}".strip()
    except OSError:
        return f"{major}:{minor}"


def machine_identity(path: Path | None = None) -> dict[str, Any]:
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "disk_device": disk_device(path),
            "kernel": platform.release(), "host": platform.node()}
