"""GB/s of the int4 kernels against the floor (a plain read of the same bytes) and torch's int4 kernel,
on Qwen3-30B-A3B shapes; ``bench/int4_kernel.py --bandwidth`` (``--quick``: a smaller pool, fewer rounds).

Fused experts: one decode token's 8 experts (D=2048, I=768) drawn from a pool of 128 (quick: 24), held
as resident experts are (huge pages, block-major scales: loading/placement.py), through ``run_fused``
(int4_ffn.c, the MoE decode path) for each kernel build asked for; torch's arm runs the same experts
as its fallback would (gate_up, silu * up, down with bf16 activations) on torch-layout copies of the
scales; the floor reads the same four buffers per expert with a plain 2-thread C loop
(bench/read_loop.c). Matmul: M=1 over a pool of distinct matrices of the model's trunk and expert
shapes, the same three kinds of arm. Arms alternate within every round on the same weights (the
machine is shared: load from other processes hits every arm alike); medians and bests of rounds.
"""
from __future__ import annotations

import ctypes
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moemesh.layers.mlp import GatedMLP, run_fused
from moemesh.loading.placement import place_expert_weights
from moemesh.quant import int4_native as n4
from moemesh.quant.int4_pack import torch_layout
from moemesh.quant.native import BASE_FLAGS, load_library
from moemesh.quant.qlinear import QuantLinear
from moemesh.quant.qlinear_state import from_state

D, I, TOP_K = 2048, 768, 8  # Qwen3-30B-A3B: hidden, expert intermediate, experts per token
# (K in, N out) at M=1: qkv (32 + 2 x 4 heads of 128), o_proj, an expert's gate_up and down
MATMUL_SHAPES = [(2048, 5120), (4096, 2048), (2048, 1536), (768, 2048)]


def random_linear(n: int, k: int, gen: torch.Generator) -> QuantLinear:
    """An int4 layer of random bytes (any bytes are a valid packing) in this machine's torch packing."""
    meta = {"mode": "int4", "in_features": k, "out_features": n, "group_size": 32, "int4_layout": list(torch_layout())}
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    s = torch.rand(k // 32, n, generator=gen) * 0.02 + 0.01
    z = torch.randn(k // 32, n, generator=gen) * 0.01
    return from_state(meta, {"qweight": qw, "scales_and_zeros": torch.stack([s, z], -1).bfloat16().contiguous()})


def read_library() -> ctypes.CDLL:
    lib = load_library("read_loop", Path(__file__).parent, ("read_loop.c",), list(BASE_FLAGS))
    lib.read_bufs.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.read_bufs.restype = ctypes.c_uint64
    return lib


def buffers(layers: list[QuantLinear]) -> list[torch.Tensor]:
    return [t for lay in layers for t in (lay.qweight, lay.int4_scales())]


def reader(lib: ctypes.CDLL, bufs: list[torch.Tensor], threads: int):
    """A call reading every buffer once (pointer and size tables built up front)."""
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    sizes = torch.tensor([b.numel() * b.element_size() for b in bufs], dtype=torch.int64)
    return lambda: lib.read_bufs(ptrs.data_ptr(), sizes.data_ptr(), len(bufs), threads)


def torch_linear(lay: QuantLinear, sz: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    return torch._weight_int4pack_mm_for_cpu(xb, lay.qweight, 32, sz)


def torch_expert(e: GatedMLP, szs: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The fallback's expert: bf16 activations into torch's int4 kernel, torch's silu."""
    gate, up = torch_linear(e.gate_up, szs[0], x.bfloat16()).float().chunk(2, -1)  # [1, I] each
    return torch_linear(e.down, szs[1], (F.silu(gate) * up).bfloat16()).float()


def run_rounds(arms: dict, draws: list, rounds: int, nbytes) -> dict[str, dict[str, list[float]]]:
    """Per arm per round: GB/s of wall time and GB per CPU-second of this process (both threads; with
    OMP_WAIT_POLICY=PASSIVE no spinning is counted), a rate other processes' load barely moves. Every
    arm runs the round's draws, arms in rotating order."""
    out: dict[str, dict[str, list[float]]] = {a: {"wall": [], "cpu": []} for a in arms}
    names = list(arms)
    for r in range(rounds + 1):  # round 0 warms up
        for a in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            for draw in draws[r]:
                arms[a](draw)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r:
                gb = sum(nbytes(d) for d in draws[r]) / 1e9
                out[a]["wall"].append(gb / dt)
                out[a]["cpu"].append(gb / max(dc, 1e-9))
    return out


def summary(gbs: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    floor = statistics.median(gbs["read"]["wall"])
    return {a: {"median_gb_s": statistics.median(v["wall"]), "best_gb_s": max(v["wall"]),
                "of_floor": statistics.median(v["wall"]) / floor, "gb_per_cpu_s": statistics.median(v["cpu"])}
            for a, v in gbs.items()}


def fused_rates(builds: dict, rd: ctypes.CDLL, threads: int, pool_n: int, rounds: int, per_round: int,
                gen: torch.Generator, rng: random.Random) -> dict[str, dict[str, list[float]]]:
    experts = [GatedMLP(random_linear(2 * I, D, gen), random_linear(D, I, gen)) for _ in range(pool_n)]
    torch_sz = {id(e): (e.gate_up.torch_scales_and_zeros(), e.down.torch_scales_and_zeros()) for e in experts}
    place_expert_weights([m for e in experts for m in e.modules()])
    x = torch.randn(1, D, generator=gen)
    nb = {id(e): sum(t.numel() * t.element_size() for t in buffers([e.gate_up, e.down])) for e in experts}
    draws = [[rng.sample(experts, TOP_K) for _ in range(per_round)] for _ in range(rounds + 1)]
    arms = {"read": lambda grp: reader(rd, buffers([m for e in grp for m in (e.gate_up, e.down)]), threads)(),
            **{f"kernel_{isa}": (lambda grp, lib=lib: run_fused(lib, grp, x)) for isa, lib in builds.items()},
            "torch": lambda grp: [torch_expert(e, torch_sz[id(e)], x) for e in grp]}
    with torch.inference_mode():
        return run_rounds(arms, draws, rounds, lambda grp: sum(nb[id(e)] for e in grp))


def matmul_rates(builds: dict, rd: ctypes.CDLL, threads: int, pool_bytes: int, rounds: int, gen: torch.Generator,
                 rng: random.Random) -> tuple[dict[str, dict[str, list[float]]], int]:
    layers: list[QuantLinear] = []
    while sum(lay.qweight.numel() for lay in layers) < pool_bytes:
        k, n = MATMUL_SHAPES[len(layers) % len(MATMUL_SHAPES)]
        layers.append(random_linear(n, k, gen))
    sz_t = {id(lay): lay.torch_scales_and_zeros() for lay in layers}
    place_expert_weights(layers)
    xs = {k: torch.randn(1, k, generator=gen) for k, _ in MATMUL_SHAPES}
    total = sum(t.numel() * t.element_size() for t in buffers(layers))
    order = [rng.sample(layers, len(layers)) for _ in range(rounds + 1)]  # a pass over the pool per round
    readers = [reader(rd, buffers(o), threads) for o in order]
    arms = {"read": lambda r: readers[r](),
            **{f"kernel_{isa}": (lambda r, lib=lib: [n4.int4_matmul(lib, xs[lay.in_features], lay.qweight,
                                                                     lay.int4_scales(), lay.kernel_fmt()) for lay in order[r]])
               for isa, lib in builds.items()},
            "torch": lambda r: [torch_linear(lay, sz_t[id(lay)], xs[lay.in_features].bfloat16()) for lay in order[r]]}
    with torch.inference_mode():
        return run_rounds(arms, [[r] for r in range(rounds + 1)], rounds, lambda r: total), total


def bandwidth(threads: int, quick: bool, isas: list[str]) -> dict:
    torch.set_num_threads(threads)
    builds = {isa: n4.load_variant(isa) for isa in isas}
    missing = [isa for isa, lib in builds.items() if lib is None]
    if missing:
        raise SystemExit(f"int4 kernel builds unavailable here: {missing} (this CPU runs {n4.cpu_isas()})")
    rd = read_library()
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    pool_n, rounds, per_round = (24, 5, 4) if quick else (128, 15, 8)
    t_start, load0 = time.time(), os.getloadavg()
    fused = fused_rates(builds, rd, threads, pool_n, rounds, per_round, gen, rng)
    matmul, pool_bytes = matmul_rates(builds, rd, threads, (64 if quick else 256) * 2**20, rounds, gen, rng)
    return {"meta": {"torch": torch.__version__, "cpu": cpu_name(), "cpu_isas": n4.cpu_isas(), "threads": threads,
                     "quick": quick, "pool_experts": pool_n, "rounds": rounds, "calls_per_round": per_round,
                     "packing": list(torch_layout()), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                     "wall_s": round(time.time() - t_start, 1)},
            "fused_experts": {"gb_s": fused, "summary": summary(fused), "shape": [D, I, TOP_K]},
            "matmul": {"gb_s": matmul, "summary": summary(matmul), "shapes": MATMUL_SHAPES, "pool_bytes": pool_bytes}}


def cpu_name() -> str:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(res: dict) -> str:
    m = res["meta"]
    md = ["# int4 kernels: GB/s of weights streamed, vs a plain read of the same bytes and torch's int4 kernel", "",
          f"{m['cpu']} ({', '.join(m['cpu_isas'])}); torch {m['torch']} (packing {tuple(m['packing'])}); "
          f"{m['threads']} threads; {m['rounds']} rounds, arms alternating in one process on the same weights; "
          f"loadavg before {m['loadavg_before'][0]:.1f}, after {m['loadavg_after'][0]:.1f} (shared machine: noisy)"
          + (" ; --quick" if m["quick"] else "") + ".", ""]
    for key, title in (("fused_experts", f"Fused experts: {TOP_K} of {m['pool_experts']} experts (D={D}, I={I}) per "
                        "call, huge pages + block scales"), ("matmul", "Matmul M=1 over "
                        f"{res['matmul']['pool_bytes'] / 2**20:.0f} MiB of {res['matmul']['shapes']} (K, N) matrices")):
        md += [f"## {title}", "", "| arm | median GB/s | best GB/s | median / floor | GB per CPU-second |",
               "|---|---:|---:|---:|---:|"]
        for arm, s in res[key]["summary"].items():
            md.append(f"| {arm} | {s['median_gb_s']:.2f} | {s['best_gb_s']:.2f} | {s['of_floor']:.2f} | "
                      f"{s['gb_per_cpu_s']:.2f} |")
        md.append("")
    return "\n".join(md)
