"""Machine probe: disk read bandwidth (O_DIRECT), memory bandwidth, weight-only matmul rates.

The numbers the performance model needs, measured once per machine and saved as JSON
(``moemesh bench`` writes it; ``moemesh plan`` reads it). Every figure is the best of several
short samples: on a shared machine the best sample is the steadiest estimate of what the
hardware does when the process gets its cores, the median is kept beside it.
"""
from __future__ import annotations

import json
import mmap
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 2**20
PROBE_VERSION = 1


def default_path() -> Path:
    return Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "probe.json"


# ---------------------------------------------------------------------- disk
def scratch_file(path: Path, size: int) -> Path:
    """A file of `size` incompressible bytes (reused if already that size) for the read test."""
    if path.is_file() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(8 * MIB)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return path


def _open_direct(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
        return os.open(path, os.O_RDONLY), False


def disk_bandwidth(path: Path, sizes: list[int], depths: list[int], seconds: float = 1.0,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Random reads of `size` bytes at 4096-aligned offsets with `depth` reads in flight (threads)."""
    fsize = path.stat().st_size
    out = []
    for size in sizes:
        for depth in depths:
            fd, direct = _open_direct(path)
            bufs = [mmap.mmap(-1, size) for _ in range(depth)]  # page-aligned, as O_DIRECT needs
            done = [0] * depth
            rng = random.Random(seed + size + depth)
            offs = [[rng.randrange(0, (fsize - size) // 4096) * 4096 for _ in range(1024)] for _ in range(depth)]
            stop = time.perf_counter() + seconds

            def reader(j: int) -> None:
                i = 0
                while time.perf_counter() < stop:
                    os.preadv(fd, [bufs[j]], offs[j][i % 1024])
                    done[j] += size
                    i += 1

            t0 = time.perf_counter()
            threads = [threading.Thread(target=reader, args=(j,)) for j in range(depth)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            os.close(fd)
            out.append({"request_bytes": size, "queue_depth": depth, "bytes_s": sum(done) / wall, "o_direct": direct})
    return out


# ---------------------------------------------------------------------- memory and matmuls
def _samples(fn: Callable[[], object], seconds: float, min_n: int = 3) -> list[float]:
    fn()  # warm-up
    out: list[float] = []
    stop = time.perf_counter() + seconds
    while len(out) < min_n or time.perf_counter() < stop:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def memory_bandwidth(nbytes: int, seconds: float) -> dict[str, float]:
    """Read bandwidth from a copy of a buffer larger than any cache (copy moves 2x the bytes)."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    s = _samples(lambda: dst.copy_(src), seconds)
    return {"bytes_s": 2 * nbytes / min(s), "bytes_s_median": 2 * nbytes / statistics.median(s), "buffer_bytes": nbytes}


def matmul_rate(fmt: str, shapes: list[tuple[int, int]], pool_bytes: int, seconds: float) -> dict[str, float]:
    """GFLOP/s of QuantLinear.forward at M=1 (one decode token) on weights streamed from DRAM:
    calls cycle over a pool of distinct expert-shaped layers larger than the last-level cache, held
    as a loaded model holds them (huge pages, block-major int4 scales: models/decode_weights.py)."""
    import torch

    from ..loading.placement import place_expert_weights
    from ..quant.qlinear import QuantLinear

    g = torch.Generator().manual_seed(0)
    layers: list[QuantLinear] = []
    while sum(lay.nbytes() for lay in layers) < pool_bytes:
        k, n = shapes[len(layers) % len(shapes)]
        layers.append(QuantLinear.from_float(torch.randn(n, k, generator=g) * k ** -0.5, None, fmt))
    place_expert_weights(layers)
    return _sweep_rate(layers, {k: torch.randn(1, k, generator=g) for k, _ in shapes}, shapes, seconds)


def _sweep_rate(layers: list, xs: dict, shapes: list[tuple[int, int]], seconds: float) -> dict[str, float]:
    """GFLOP/s of one M=1 pass over every layer of a pool (xs: in_features -> [1, K] input)."""
    import torch

    flops = sum(2 * lay.in_features * lay.out_features for lay in layers)

    def sweep() -> None:
        for lay in layers:
            lay(xs[lay.in_features])

    with torch.inference_mode():
        s = _samples(sweep, seconds)
    return {"gflops": flops / min(s) / 1e9, "gflops_median": flops / statistics.median(s) / 1e9,
            "pool_bytes": sum(lay.nbytes() for lay in layers), "shapes": [list(x) for x in shapes]}


def block_rate(qtype: str, shapes: list[tuple[int, int]], pool_bytes: int, seconds: float) -> dict[str, float] | None:
    """GFLOP/s of a BlockLinear (quant/blocks.py: a GGUF/MXFP4 linear computed from its blocks) at M=1
    over a pool of expert-shaped layers larger than the last-level cache; None when its kernels are
    unavailable. The bytes are random with every block's fp16 scale set to 1/1024: rates do not depend
    on the values, and no scale is a NaN or a denormal."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType

    from ..quant import blocks_native
    from ..quant.blocks import BlockLinear, block_size, row_bytes

    if blocks_native.load_native() is None:
        return None
    rng = np.random.default_rng(0)
    block, size = block_size(qtype)
    scale_at = {"Q4_K": (0, 2), "MXFP4": ()}[qtype]
    layers: list[BlockLinear] = []
    while sum(lay.nbytes() for lay in layers) < pool_bytes:
        k, n = shapes[len(layers) % len(shapes)]
        raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
        if qtype == "MXFP4":
            raw[:, 0] = 120  # e8m0 exponent 2^-7
        for off in scale_at:
            raw[:, off:off + 2] = np.array([1 / 1024], np.float16).view(np.uint8)
        layers.append(BlockLinear(qtype, torch.from_numpy(raw.reshape(n, row_bytes(qtype, k))), k))
    assert GGMLQuantizationType[qtype]  # a GGUF type name
    return _sweep_rate(layers, {k: torch.randn(1, k) for k, _ in shapes}, shapes, seconds)


def fused_experts_rate(d: int, inter: int, top_k: int, pool_bytes: int, seconds: float) -> dict[str, float] | None:
    """GFLOP/s of one decode token's experts in one fused int4 call (mlp.run_fused, the path every
    int4 MoE layer decodes through), ``top_k`` distinct experts per call cycling over a pool larger
    than the last-level cache, held as resident experts are (huge pages, block-major scales; the
    lazy cache's slots keep torch's layout on 4 KiB pages, ~25% slower: capped runs are
    disk-bound); None without the C kernel."""
    import torch

    from ..layers.mlp import GatedMLP, run_fused
    from ..loading.placement import place_expert_weights
    from ..quant import int4_native
    from ..quant.qlinear import QuantLinear

    lib = int4_native.load_native()
    if lib is None:
        return None
    g = torch.Generator().manual_seed(1)

    def lin(n: int, k: int) -> QuantLinear:
        return QuantLinear.from_float(torch.randn(n, k, generator=g) * k ** -0.5, None, "int4")

    experts: list[GatedMLP] = []
    while sum(e.nbytes() for e in experts) < pool_bytes or len(experts) % top_k:
        experts.append(GatedMLP(lin(2 * inter, d), lin(d, inter)))
    place_expert_weights([m for e in experts for m in e.modules()])  # (before anything caches a pointer)
    groups = [experts[i : i + top_k] for i in range(0, len(experts), top_k)]
    x = torch.randn(1, d, generator=g)  # [1, D]
    flops = 2 * 3 * d * inter * len(experts)

    def sweep() -> None:
        for grp in groups:
            run_fused(lib, grp, x)

    with torch.inference_mode():
        s = _samples(sweep, seconds)
    return {"gflops": flops / min(s) / 1e9, "gflops_median": flops / statistics.median(s) / 1e9,
            "pool_bytes": sum(e.nbytes() for e in experts), "shape": [d, inter, top_k]}


# ---------------------------------------------------------------------- the probe
def run_probe(disk_dir: Path | None = None, disk_file: Path | None = None, threads: int = 2, quick: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything; `disk_file` (an existing large file, e.g. a store's experts.bin) or a
    scratch file written under `disk_dir` (removed afterwards) is read for the disk numbers."""
    import torch

    from .machine_id import machine_identity

    torch.set_num_threads(threads)
    t0 = time.time()
    scale = 0.5 if quick else 1.0
    scratch = None
    if disk_file is None:
        disk_dir = Path(disk_dir or default_path().parent)
        scratch = scratch_file(disk_dir / f"probe-scratch-{os.getpid()}.bin", (512 if quick else 2048) * MIB)
        disk_file = scratch
    try:
        log(f"disk: O_DIRECT random reads on {disk_file} ...")
        disk = disk_bandwidth(Path(disk_file), [2 * MIB, 4 * MIB, 8 * MIB], [1, 8], seconds=1.0 * scale)
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
    for d in disk:
        log(f"  {d['request_bytes'] / MIB:.0f} MiB x QD{d['queue_depth']}: {d['bytes_s'] / 1e9:.2f} GB/s")
    log("memory bandwidth ...")
    mem = memory_bandwidth((256 if quick else 512) * MIB, 2.0 * scale)
    log(f"  {mem['bytes_s'] / 1e9:.1f} GB/s")
    shapes = [(2048, 1536), (768, 2048)]  # (in, out): Qwen3-30B-A3B's fused gate_up and down
    matmul = {}
    for fmt in ("int4", "int8", "bf16"):
        matmul[fmt] = matmul_rate(fmt, shapes, 96 * MIB, 2.0 * scale)
        log(f"{fmt} matmul (M=1, weights from DRAM): {matmul[fmt]['gflops']:.1f} GFLOP/s")
    for qtype in ("Q4_K", "MXFP4"):  # the block kernels (plan's native rows; the other types take the nearest)
        rate = block_rate(qtype, shapes, 96 * MIB, 1.0 * scale)
        if rate is not None:
            matmul[qtype] = rate
            log(f"{qtype} matmul (M=1, block kernel, weights from DRAM): {rate['gflops']:.1f} GFLOP/s")
    fused = fused_experts_rate(2048, 768, 8, 96 * MIB, 2.0 * scale)  # Qwen3-30B-A3B's experts, top-8
    if fused is not None:
        matmul["int4"]["fused_experts"] = fused
        log(f"int4 fused experts (8 per call, weights from DRAM): {fused['gflops']:.1f} GFLOP/s")
    from .overhead import layer_overhead

    log("eager decode overhead per layer (tiny qwen3_moe, 2 vs 8 layers) ...")
    overhead = layer_overhead(steps=20 if quick else 40)
    log(f"  {overhead['layer_s'] * 1e3:.2f} ms per layer")
    return {
        "version": PROBE_VERSION, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "threads": threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg": os.getloadavg(), "torch": torch.__version__, "ram_bytes": total_ram(),
                    "identity": machine_identity(Path(disk_file).parent)},  # benchkit/probe_check.py compares it
        "disk": {"file": str(disk_file), "measurements": disk}, "memory": mem, "matmul": matmul,
        "overhead": overhead, "seconds": time.time() - t0,
    }


def total_ram() -> int:
    """MemTotal, or this process's cgroup memory limit when lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(p).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, int(text))
    return ram


def save(probe: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(probe, indent=1))
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any] | None:
    """The saved probe, or None when there is none (a corrupt file counts as none)."""
    try:
        probe = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return probe if isinstance(probe, dict) and probe.get("version") == PROBE_VERSION else None
