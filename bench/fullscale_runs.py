"""bench/fullscale.py's pieces: one engine run in a fresh capped process, the disk floor (O_DIRECT reads
of the file at the engine's request size and queue depth), the compute floor of a prefill (the expert
matmuls at the rows per expert a prompt gives), the exactness check in a process of its own, and
`moemesh plan`'s prediction for a run."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402

MIB = 2**20


def run(engine: str, cfg: dict, cap: int | None, timeout: float, args) -> dict:
    """engine: moemesh (bench/fullscale_worker.py) or llama.cpp (bench/lazy_llama.py). The cap holds from
    the process's first byte unless --load-headroom-mib > 0 (then: load under cap + headroom, decode under cap)."""
    if cap is not None and args.load_headroom_mib:
        cfg = {**cfg, "cap_after_load": cap}
        limit = cap + args.load_headroom_mib * MIB
    else:
        limit = cap
    script = "fullscale_worker.py" if engine == "moemesh" else "lazy_llama.py"
    py = sys.executable if engine == "moemesh" else args.llama_python
    cgroup.drop_caches()  # every run starts cold, capped or not
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    o = cgroup.run([py, str(HERE / script), json.dumps(cfg)], limit, timeout, name="fullscale", env=env)
    res = None
    for line in o.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
    if res is None:
        why = (f"timeout after {timeout:.0f} s" if o.returncode is None else
               "oom-killed" if (o.cgroup.get("oom_kill") or 0) > 0 else f"exit {o.returncode}")
        res = {"engine": engine, "error": why, "stderr_tail": o.stderr[-1500:]}
    res.update(process_wall_s=o.wall_s, cgroup=o.cgroup, cap_bytes=cap)
    return res


def disk_floor(path: Path, request: int, depth: int, rounds: int, seconds: float) -> dict:
    """Median sustained O_DIRECT random-read bandwidth of ``path`` at (request, depth)."""
    from moemesh.benchkit.probe import disk_bandwidth

    rates = [disk_bandwidth(path, [request], [depth], seconds=seconds, seed=r)[0]["bytes_s"] for r in range(rounds)]
    return {"request_bytes": request, "queue_depth": depth, "bytes_s": statistics.median(rates), "all": rates}


def expert_slice_bytes(path: Path) -> int:
    """One expert's share of one stacked expert tensor (a read the engine issues for a miss)."""
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(str(path)).tensors if t.name.endswith("ffn_gate_exps.weight"))
    return int(t.n_bytes) // int(t.shape[-1])


def compute_rate(qtype: str, d: int, inter: int, rows: int, seconds: float = 2.0) -> dict | None:
    """GFLOP/s of the block kernels on one expert's gate, up, down at ``rows`` tokens (a prefill's rows
    per routed expert): the compute floor of a prefill's experts. Random valid blocks (benchkit/synth)."""
    return block_rate(qtype, [(d, inter), (d, inter), (inter, d)], rows, seconds)


def block_rate(qtype: str, shapes: list[tuple[int, int]], rows: int, seconds: float = 2.0) -> dict | None:
    """GFLOP/s of the block kernels on matrices of ``shapes`` (in, out) at ``rows`` tokens, random valid blocks."""
    import numpy as np
    import torch

    from moemesh.benchkit.synth.whole_fill import block_chunks, pool
    from moemesh.quant import blocks_native
    from moemesh.quant.blocks import BlockLinear, row_bytes

    if blocks_native.load_native() is None:
        return None
    words, rng = pool(1), np.random.default_rng(1)
    mats = []
    for k, n in shapes:
        raw = np.concatenate(list(block_chunks(qtype, n * row_bytes(qtype, k), words, rng)))
        mats.append(BlockLinear(qtype, torch.from_numpy(raw.reshape(n, row_bytes(qtype, k))), k))
    xs = {k: torch.randn(rows, k) for k, _ in shapes}  # [rows, K]
    flops = sum(2 * rows * m.in_features * m.out_features for m in mats)
    times = []
    stop = time.perf_counter() + seconds
    with torch.inference_mode():
        while time.perf_counter() < stop or len(times) < 3:
            t = time.perf_counter()
            for m in mats:
                m(xs[m.in_features])
            times.append(time.perf_counter() - t)
    return {"rows": rows, "gflops": flops / statistics.median(times) / 1e9, "qtype": qtype}


def attention_rate(heads: int, kv_heads: int, head_dim: int, start: int, rows: int = 512, seconds: float = 2.0,
                   sinks: bool = False) -> dict | None:
    """G multiply-adds/s of the prefill attention kernel (quant/attention_prefill.c) on one ``rows``-query chunk
    at position ``start`` (scores and values of the keys each query sees): a prompt's attention floor."""
    import torch

    from moemesh.quant import decode_kernels

    lib = decode_kernels.load()
    if lib is None:
        return None
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(kv_heads, start + rows, head_dim, generator=g)
    values = torch.randn(kv_heads, start + rows, head_dim, generator=g)
    q = torch.randn(rows, heads, head_dim, generator=g)
    s = torch.randn(heads, generator=g) if sinks else None
    macs = heads * 2 * head_dim * sum(start + i + 1 for i in range(rows))
    times = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 3:
        t = time.perf_counter()
        decode_kernels.attend_prefill(lib, q, keys, values, head_dim, start, None, head_dim**-0.5, s)
        times.append(time.perf_counter() - t)
    return {"rows": rows, "start": start, "gmacs_s": macs / statistics.median(times) / 1e9}


def exactness(path: Path, layers: int, tokens: int, chunk: int, timeout: float) -> dict:
    """benchkit/synth/whole_check.check on the file's first ``layers`` layers, in a process of its own."""
    code = ("import json, sys; from pathlib import Path; from moemesh.benchkit.synth.whole_check import check; "
            "r = check(Path(sys.argv[1]), tokens=int(sys.argv[3]), chunk=int(sys.argv[4]), layers=int(sys.argv[2])); "
            "r.pop('last_logits'); print('RESULT ' + json.dumps(r))")
    try:
        o = subprocess.run([sys.executable, "-c", code, str(path), str(layers), str(tokens), str(chunk)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in o.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {o.returncode}", "stderr_tail": o.stderr[-1500:]}


def plan_row(path: Path, ram: int | None, probe: dict | None, fmt: str) -> dict | None:
    """`moemesh plan FILE --ram RAM`'s row for the file's own expert format (uniform routing)."""
    if probe is None:
        return None
    from moemesh.commands.plan import plan

    p = plan(str(path), ram if ram is not None else 2**50, 1, probe)
    f = p["formats"].get(fmt) or next(iter(p["formats"].values()))
    keys = ("tokens_per_s", "fits", "cache_slots", "hit_rate", "disk_floor_s", "memory_floor_s", "compute_floor_s", "why")
    return {"ram_bytes": ram, "format": fmt if fmt in p["formats"] else "?", **{k: f.get(k) for k in keys}}
