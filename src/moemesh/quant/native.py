"""Build and load the project's small C kernels (TurboQuant attention, the int4 matmul) on first use.

``cc -O3 -march=native`` into ``$MOEMESH_CACHE_DIR/native`` (default ~/.cache/moemesh/native), the
file name keyed by a hash of the sources, the flags and this CPU's feature flags (a library built
with -march=native must not be reused on another CPU). OpenMP is tried first (libgomp's soname
matches torch's bundled one, so both share one thread pool) and dropped if the compiler lacks it.
The library is renamed into place, so concurrent builders never see half of one.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

BASE_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fopenmp")  # retried without -fopenmp


@cache  # read once per process: load_native() asks on every int4 call of a decode step
def cpu_flags() -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""


def _compile(texts: dict[str, str], flags: list[str], target: Path) -> None:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise OSError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for name, text in texts.items():
            (Path(tmp) / name).write_text(text)
        lib = Path(tmp) / target.name
        srcs = [str(Path(tmp) / n) for n in texts if n.endswith(".c")]
        try:
            subprocess.run([cc, *flags, *srcs, "-o", str(lib), "-lm"], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            plain = [f for f in flags if f != "-fopenmp"]
            subprocess.run([cc, *plain, *srcs, "-o", str(lib), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(lib, target)


def load_library(stem: str, source_dir: Path, sources: tuple[str, ...], flags: list[str]) -> ctypes.CDLL:
    """The compiled library of ``sources`` (built now if this CPU has none cached). Raises OSError
    or subprocess.SubprocessError when it cannot be built; callers fall back to torch then."""
    texts = {name: (source_dir / name).read_text() for name in sources}
    key = hashlib.sha256("\0".join([*texts.values(), " ".join(flags), cpu_flags()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOEMESH_CACHE_DIR", Path.home() / ".cache" / "moemesh")) / "native"
    path = root / f"{stem}_{key}.so"
    if not path.exists():
        _compile(texts, flags, path)
    return ctypes.CDLL(str(path))
