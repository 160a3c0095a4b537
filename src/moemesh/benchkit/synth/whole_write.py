"""Writing a whole synthetic model's GGUF (benchkit/synth/whole.py): once, resumable, with a progress
bar and a disk check.

Layout under the data dir: ``KEY/model.gguf`` plus ``KEY/DONE`` (json) once finished. While writing:
``KEY/model.gguf.partial`` and ``KEY/progress.json`` (the spec and how many tensors are complete);
an interrupted run continues from the last complete tensor (the bytes are deterministic, so the
file is the same as one written in one go); a progress file for another spec restarts it.

    python -m moemesh.benchkit.synth.whole_write gpt-oss-120b [--dir DIR] [--remove]
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ...errors import MoemeshError
from . import whole
from .whole_fill import pool, tensor_chunks

ALIGN = 32  # GGUF's default data alignment
MARGIN = 256 << 20  # free bytes left on the disk after the file


def pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def model_dir(spec: whole.WholeSpec, directory: Path | None = None) -> Path:
    return (directory or whole.data_dir()) / spec.key()


def finished(spec: whole.WholeSpec, directory: Path | None = None) -> Path | None:
    root = model_dir(spec, directory)
    try:
        done = json.loads((root / "DONE").read_text())
    except (OSError, ValueError):
        return None
    path = root / "model.gguf"
    ok = done.get("spec") == spec.as_dict() and path.is_file() and path.stat().st_size == done.get("bytes")
    return path if ok else None


def write_header(path: Path, spec: whole.WholeSpec) -> int:
    """Header, metadata and tensor infos; returns where the tensor data starts."""
    import gguf

    w = gguf.GGUFWriter(str(path), spec.arch)
    whole.metadata(w, spec)
    for name, shape, qtype, _ in whole.tensors(spec):
        n = whole.nbytes(shape, qtype)
        if qtype == "F32":
            w.add_tensor_info(name, list(shape), np.dtype(np.float32), n)
        else:
            q = gguf.GGMLQuantizationType[qtype]
            block, size = gguf.GGML_QUANT_SIZES[q]
            w.add_tensor_info(name, list(shape[:-1]) + [shape[-1] // block * size], np.dtype(np.uint8), n, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return pad(path.stat().st_size)


def _save(progress: Path, state: dict) -> None:
    tmp = progress.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, progress)


def write(spec: whole.WholeSpec, directory: Path | None = None, progress: bool = True,
          chunks: Callable[[int, str, tuple, str, str, int], Iterator[np.ndarray]] | None = None,
          log: Callable[[str], None] = print) -> Path:
    """The finished GGUF of ``spec`` (written or continued here unless already there). ``chunks``
    (index, name, shape, type, role, nbytes) -> byte chunks replaces the random fill (prefix copies)."""
    from tqdm import tqdm

    done = finished(spec, directory)
    if done is not None:
        return done
    root = model_dir(spec, directory)
    root.mkdir(parents=True, exist_ok=True)
    part, prog, final = root / "model.gguf.partial", root / "progress.json", root / "model.gguf"
    ts = whole.tensors(spec)
    sizes = [whole.nbytes(shape, q) for _, shape, q, _ in ts]
    offsets = np.cumsum([0] + [pad(n) for n in sizes]).tolist()
    try:
        state = json.loads(prog.read_text())
    except (OSError, ValueError):
        state = None
    if not (state and state.get("spec") == spec.as_dict() and part.is_file()
            and part.stat().st_size >= state["data_start"] + offsets[state["tensors_done"]]):
        final.unlink(missing_ok=True)
        (root / "DONE").unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        state = None
    header_guess = state["data_start"] if state else 64 << 20  # a 200K-token vocabulary: ~5 MB of header
    have = part.stat().st_size if state else 0
    need = header_guess + offsets[-1] - have + MARGIN
    free = shutil.disk_usage(root).free
    if need > free:
        raise MoemeshError(f"{final}: writing {spec.name} needs {need / 1e9:.1f} GB more on {root.parent} "
                           f"({(offsets[-1]) / 1e9:.1f} GB in all) but {free / 1e9:.1f} GB are free; free space, "
                           f"or set MOEMESH_BENCH_DATA to a bigger disk")
    if state is None:
        state = {"spec": spec.as_dict(), "data_start": write_header(part, spec), "tensors_done": 0, "started": time.time()}
        _save(prog, state)
    else:
        log(f"{spec.name}: continuing {part} at tensor {state['tensors_done']}/{len(ts)}")
    start, k = state["data_start"], state["tensors_done"]
    words = pool(spec.seed)
    bar = tqdm(total=offsets[-1], initial=offsets[k], unit="B", unit_scale=True, desc=spec.name, disable=not progress)
    with open(part, "r+b") as f:
        f.truncate(start + offsets[k])
        fd = f.fileno()
        for i in range(k, len(ts)):
            name, shape, qtype, role = ts[i]
            f.seek(start + offsets[i])
            src = (chunks(i, name, shape, qtype, role, sizes[i]) if chunks
                   else tensor_chunks(role, shape, qtype, sizes[i], spec.seed, i, words))
            written = 0
            for c in src:
                f.write(memoryview(np.ascontiguousarray(c)).cast("B"))
                written += c.nbytes
                bar.update(c.nbytes)
            if written != sizes[i]:
                raise MoemeshError(f"{part}: tensor {name}: wrote {written} bytes, expected {sizes[i]}")
            f.write(b"\0" * (pad(written) - written))
            f.flush()
            os.fdatasync(fd)
            os.posix_fadvise(fd, start + offsets[i], pad(written), os.POSIX_FADV_DONTNEED)  # not the page cache's
            state["tensors_done"] = i + 1
            _save(prog, state)
    bar.close()
    size = part.stat().st_size
    os.replace(part, final)
    (root / "DONE").write_text(json.dumps({"spec": spec.as_dict(), "bytes": size,
                                           "seconds": time.time() - state["started"]}))
    prog.unlink(missing_ok=True)
    return final


def remove(spec: whole.WholeSpec, directory: Path | None = None) -> None:
    """Delete a whole model (finished or partial) to free its disk."""
    shutil.rmtree(model_dir(spec, directory), ignore_errors=True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write (or continue) a whole synthetic model's GGUF")
    ap.add_argument("model", choices=sorted(whole.SPECS))
    ap.add_argument("--dir", type=Path, help="data dir (default $MOEMESH_BENCH_DATA or ~/.cache/moemesh/bench-data)")
    ap.add_argument("--tiny", action="store_true", help="the same code path at a few MB")
    ap.add_argument("--remove", action="store_true", help="delete it instead")
    a = ap.parse_args()
    spec = whole.tiny_spec(a.model) if a.tiny else whole.SPECS[a.model]
    if a.remove:
        remove(spec, a.dir)
        return
    t = time.time()
    path = write(spec, a.dir)
    print(f"{path}: {path.stat().st_size / 1e9:.2f} GB ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
