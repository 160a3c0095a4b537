"""Predicted decode tokens/s of an MoE model at a RAM budget, from the machine probe.

Per decode token (DESIGN.md, "Performance model"), with L MoE layers, k active experts, blob
size S, N experts per layer, a cache of C slots and hit rate h:

* disk floor    ``L * k * (1 - h) * S / B_disk``   (h = C / (L * N) for uniform routing; from a routing
  profile or trace when one is given: ``profile_hit_rate``, benchkit/cache_sim.py)
* memory floor  ``active_bytes / B_mem``
* compute floor ``2 * active_matmul_params / R_fmt`` (R_fmt: the probe's M=1 matmul rate; int4 routed
  experts at the probe's fused-expert rate when it has one: ``compute_seconds``)
* eager overhead ``layers * o`` (o: the probe's measured per-layer cost of the real decode code
  beyond its weight bytes, benchkit/overhead.py; 0 for probes made before it existed)

The prediction is ``max(memory, compute) + overhead + IO_FACTOR * disk``. Measured (bench/plan_check.py):
on a 2-core machine the expert reads do not hide behind compute (the I/O threads, checksums and
building the expert views share the two cores with the matmuls; wrongly prefetched experts are
read too), so the disk floor adds to the compute time rather than overlapping it. IO_FACTOR is
the one calibration constant: the ratio of measured extra time to the disk floor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..experts.budget import RUNTIME_OVERHEAD
from .shapes import FormatBytes, ModelShape, format_bytes

KV_RESERVE = 64 * 2**20  # ExpertOptions.kv_reserve's default
# bench/plan_check.py's least-squares refit over its three caps, with the hit rate replayed from the
# recorded routing trace (benchkit/cache_sim.py): 0.95 and 1.00 in the two runs it was set from,
# then 0.87, 0.99, 0.84 and 1.20 in the check runs after it (bench/results/plan_check.md), so the disk
# floor simply adds to the CPU time: the wasted prefetch reads (~1.2x the missed bytes) about cancel
# the reads that prefetching hides behind compute. Earlier values, fit on one cap with a hit rate that
# counted cold misses: 1.29, 1.47, 1.65 (best-of disk bandwidth), 1.3 (older runs of bench/lazy.py).
IO_FACTOR = 1.0


# One pipeline-stage call between mesh nodes over hivemind, on loopback: bench/mesh.py's "transport
# ms/call" (call wall time minus the stage's own compute) measured 3.9-5.7 ms (bench/results/mesh.md).
# A token crosses N - 1 stage boundaries on N nodes; the network's round trip comes on top.
MESH_HOP_S = 0.005


@dataclass
class Prediction:
    fits: bool  # False: the trunk plus one layer's active experts do not fit the RAM
    slots: int  # expert cache slots the budget leaves (all experts when everything fits)
    hit_rate: float
    disk_s: float  # per token
    memory_s: float
    compute_s: float
    seconds_per_token: float | None
    tokens_per_s: float | None
    why: str = ""
    overhead_s: float = 0.0  # per token: eager dispatch beyond the weight bytes


def disk_bandwidth(probe: dict[str, Any], request_bytes: int) -> float:
    """Median measured bandwidth over the probe's request sizes within 4x of one expert's blob (the
    nearest size when none is): single samples of this disk swing 1.1-2.3 GB/s between runs, and a
    best-of would make IO_FACTOR absorb one lucky sample."""
    import math
    import statistics

    ms = probe["disk"]["measurements"]
    size = max(request_bytes, 1)
    near = [m for m in ms if abs(math.log(m["request_bytes"] / size)) <= math.log(4)]
    if not near:
        best = min({m["request_bytes"] for m in ms}, key=lambda r: abs(math.log(r / size)))
        near = [m for m in ms if m["request_bytes"] == best]
    return statistics.median(m["bytes_s"] for m in near)


def ram_to_hold_all(fb: FormatBytes) -> int:
    return fb.trunk_ram + fb.experts + KV_RESERVE + RUNTIME_OVERHEAD


def cache_slots(shape: ModelShape, fb: FormatBytes, ram: int) -> int:
    """As experts/budget.plan_budget: what remains after trunk, KV reserve and runtime, in blobs."""
    return max(0, (ram - fb.trunk_ram - KV_RESERVE - RUNTIME_OVERHEAD) // fb.expert)


def uniform_hit_rate(shape: ModelShape, slots: int) -> float:
    """Steady-state hit rate of C cached experts out of L * N when routing is uniform: C / (L * N)."""
    total = shape.moe_layers * shape.num_experts
    return 1.0 if total == 0 else min(1.0, slots / total)


def profile_hit_rate(counts: list[list[float]], slots: int) -> float:
    """Hit rate of a frequency-ordered cache (LFU) that starts empty, replaying a measured routing
    profile (counts[layer][expert] = picks): the `slots` most picked (layer, expert) pairs stay
    cached, each missing once when first picked. Over a long profile this tends to the steady
    state; over a short one it keeps the cold misses a short run really pays."""
    flat = sorted((float(c) for layer in counts for c in layer), reverse=True)
    total = sum(flat)
    return 1.0 if total == 0 else sum(max(0.0, c - 1) for c in flat[:slots]) / total


def matmul_rates(probe: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The probe's M=1 rates for ``fmt``; a native block format the probe did not measure takes the
    nearest measured one (the K-quants Q4_K's, the others MXFP4's; probes made before the block
    kernels: int8's, a stand-in of about the same bytes per weight)."""
    m = probe["matmul"]
    for name in (fmt, "Q4_K" if fmt.endswith("_K") else "MXFP4", "int8"):
        if name in m:
            return m[name]
    return m["int8"]


def compute_seconds(shape: ModelShape, fmt: str, probe: dict[str, Any]) -> float:
    """2 FLOPs per active weight at the probe's rates: the routed experts at the fused-expert rate
    when the probe measured it (int4: one C call per layer, ~1.5x the per-linear rate here), the
    trunk and head at the per-linear M=1 rate."""
    rates = matmul_rates(probe, fmt)
    fused = (rates.get("fused_experts") or {}).get("gflops")
    if not fused:
        return 2 * shape.active_matmul_params / (rates["gflops"] * 1e9)
    experts = shape.moe_layers * shape.top_k * sum(lin.n_out * lin.n_in for lin in shape.expert_linears)
    return 2 * (shape.active_matmul_params - experts) / (rates["gflops"] * 1e9) + 2 * experts / (fused * 1e9)


def predict(shape: ModelShape, fmt: str, ram: int, probe: dict[str, Any], hit_rate: float | None = None,
            routing: list[list[float]] | None = None, io_factor: float = IO_FACTOR) -> Prediction:
    """hit_rate: a fixed rate; routing: a measured profile (counts per layer and expert); neither:
    uniform routing (the worst case for a cache)."""
    fb = format_bytes(shape, fmt)
    mem_s = fb.active / probe["memory"]["bytes_s"]
    compute_s = compute_seconds(shape, fmt, probe)
    overhead_s = shape.num_layers * float((probe.get("overhead") or {}).get("layer_s", 0.0))
    cpu_s = max(mem_s, compute_s) + overhead_s
    total = shape.moe_layers * shape.num_experts
    if ram >= ram_to_hold_all(fb) or total == 0:
        return Prediction(True, total, 1.0, 0.0, mem_s, compute_s, cpu_s, 1 / cpu_s, overhead_s=overhead_s)
    slots = cache_slots(shape, fb, ram)
    if slots < shape.top_k:
        need = fb.trunk_ram + KV_RESERVE + RUNTIME_OVERHEAD + shape.top_k * fb.expert
        return Prediction(False, slots, 0.0, 0.0, mem_s, compute_s, None, None,
                          f"needs at least {need / 2**30:.1f} GiB (trunk + runtime + one layer's active experts)",
                          overhead_s)
    h = hit_rate if hit_rate is not None else (
        profile_hit_rate(routing, slots) if routing is not None else uniform_hit_rate(shape, slots))
    disk_s = shape.moe_layers * shape.top_k * (1 - h) * fb.expert / disk_bandwidth(probe, fb.expert)
    t = cpu_s + io_factor * disk_s
    return Prediction(True, slots, h, disk_s, mem_s, compute_s, t, 1 / t, overhead_s=overhead_s)


def mesh_seconds(nodes: int, rtt_s: float) -> float:
    """Per token, the stage calls of a pipeline over `nodes` nodes: (N - 1) x (transport + round trip)."""
    return max(0, nodes - 1) * (MESH_HOP_S + rtt_s)


def nodes_to_hold(fb: FormatBytes, ram: int) -> int | None:
    """Mesh nodes of `ram` each that hold the whole model in RAM, split by layer ranges: each
    node holds its share of trunk and experts plus its own runtime and KV reserve."""
    usable = ram - KV_RESERVE - RUNTIME_OVERHEAD
    if usable <= 0:
        return None
    return max(1, -(-(fb.trunk_ram + fb.experts) // usable))
