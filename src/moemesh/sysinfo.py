"""Process memory figures, read from /proc where possible."""
from __future__ import annotations

import ctypes
import resource
import subprocess
from collections.abc import Callable


def peak_rss_bytes() -> int:
    """Peak resident set of this process image.

    VmHWM (the high-water mark of the current address space) rather than ru_maxrss: Linux
    carries ru_maxrss across fork and exec, so a CLI started from a large parent (a test runner,
    a server) would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc malloc_trim). Loading leaves ~200 MiB of freed
    transients (quantizing a trunk at load) in malloc's arenas, where they count against --ram and a
    cgroup limit until reused; False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def terminate(proc: subprocess.Popen, grace_s: float = 10.0, kill: Callable[[], None] | None = None) -> None:
    """Stop a child process: SIGTERM, then (after ``grace_s``) ``kill`` or SIGKILL; waits for it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        if kill is not None:
            kill()
        else:
            proc.kill()
            proc.wait(5)
