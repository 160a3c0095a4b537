"""``moemesh plan MODEL``: will it run here? Sizes per weight format and predicted tokens/s.

MODEL is an HF checkpoint directory, a config.json, an expert store, a GGUF file or a well-known
name (``moemesh plan --list``). Predictions use the machine probe that ``moemesh bench`` saves and
the performance model in benchkit/perfmodel.py (uniform routing unless --hit-rate or --routing is
given).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import MoemeshError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="will a model run here? sizes per format, predicted tokens/s, mesh nodes")
    p.add_argument("model", nargs="?", help="checkpoint dir, config.json, expert store, .gguf, or a known model name")
    p.add_argument("--ram", help="RAM per node for the prediction, e.g. 16G (default: this machine's)")
    p.add_argument("--nodes", type=int, default=1, help="predict for N mesh nodes of --ram each (default 1)")
    p.add_argument("--rtt-ms", type=float, default=0.5,
                   help="network round trip between mesh nodes for --nodes > 1 (default 0.5: a LAN), added to each "
                        "stage call's measured ~5 ms transport cost")
    p.add_argument("--probe", help="machine probe JSON (default: the one `moemesh bench` saved)")
    p.add_argument("--hit-rate", type=float, help="expert cache hit rate to assume (default: uniform routing, C/N)")
    p.add_argument("--routing", help="routing JSON for the hit rate: {\"trace\": [[moe layer, experts...] per router "
                   "call]} (replayed through the LFU cache) or {\"counts\": [[picks per expert] per MoE layer]}")
    p.add_argument("--formats", help="more native rows, e.g. Q2_K,IQ4_XS (the file's own and the model's published "
                   "formats are always shown)")
    p.add_argument("--any-probe", action="store_true",
                   help="predict tok/s even from a probe of another machine or older than 30 days (default: refused)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the well-known model names")
    p.set_defaults(func=run)


def plan(model: str, ram: int, nodes: int, probe: dict[str, Any] | None, hit_rate: float | None = None,
         routing: list[list[float]] | None = None, trace: list[list[int]] | None = None,
         rtt_s: float = 0.0005, trace_warmup: int | None = None, extra_formats: list[str] | None = None) -> dict[str, Any]:
    """trace: recorded router calls ``[moe layer, experts...]``, replayed through the expert cache's
    LFU policy at each format's slot count for the hit rate; its first ``trace_warmup`` calls (default:
    a tenth) only warm the cache.
    nodes > 1: a pipeline by layer ranges; each token pays nodes - 1 stage calls (``mesh_seconds``)."""
    from ..benchkit.known import NATIVE_FORMATS
    from ..benchkit.perfmodel import (
        KV_RESERVE,
        RUNTIME_OVERHEAD,
        cache_slots,
        mesh_seconds,
        nodes_to_hold,
        predict,
        ram_to_hold_all,
    )
    from ..benchkit.shapes import FORMATS, NATIVE, format_bytes, shape_from_config
    from ..benchkit.source import resolve
    from ..store.expert_source import ALIGN, round_up

    name, cfg, stored = resolve(model)
    shape = shape_from_config(cfg, name)
    if stored is not None and stored.blob_size and stored.quant:  # an expert store: its blobs as written
        shape.stored_blobs[stored.quant] = stored.blob_size
    native = list(stored.native if stored is not None else []) or list(NATIVE_FORMATS.get(name, []))
    for f in extra_formats or []:
        if f not in NATIVE:
            raise MoemeshError(f"--formats: {f!r} is not one of {', '.join(NATIVE)}")
        native += [f] if f not in native else []
    if stored is not None and stored.native and stored.native_expert_bytes:  # read in place: a slot holds one
        # expert's bytes plus the alignment slack of its three pieces (store/file_experts.py)
        shape.stored_blobs[stored.native[0]] = round_up(stored.native_expert_bytes) + 3 * ALIGN
    # N nodes split the model by layer ranges: their RAM adds up, each pays its own runtime
    pooled = nodes * ram - (nodes - 1) * (KV_RESERVE + RUNTIME_OVERHEAD)
    out: dict[str, Any] = {
        "model": name, "model_type": shape.model_type, "total_params": shape.total_params,
        "active_params": shape.active_params, "active_params_no_embedding": shape.active_params_no_embedding,
        "layers": shape.num_layers, "moe_layers": shape.moe_layers, "experts": shape.num_experts,
        "top_k": shape.top_k, "vocab_size": shape.vocab_size, "ram_bytes": ram, "nodes": nodes,
        "notes": shape.notes, "stored": None if stored is None else vars(stored), "formats": {},
    }
    for fmt in FORMATS + tuple(native):
        fb = format_bytes(shape, fmt)
        row = {"disk_bytes": fb.disk, "trunk_disk_bytes": fb.trunk_disk, "trunk_ram_bytes": fb.trunk_ram,
               "expert_bytes": fb.expert, "experts_bytes": fb.experts, "active_bytes_per_token": fb.active,
               "ram_to_hold_all_bytes": ram_to_hold_all(fb), "nodes_to_hold_all": nodes_to_hold(fb, ram)}
        if probe is not None:
            h = hit_rate
            if trace is not None and h is None:
                skip = len(trace) // 10 if trace_warmup is None else trace_warmup
                h = trace_hit_rate(trace, cache_slots(shape, fb, pooled), shape.top_k, skip)
            p = predict(shape, fmt, pooled, probe, h, routing)
            net = mesh_seconds(nodes, rtt_s)
            tps = None if p.seconds_per_token is None else 1 / (p.seconds_per_token + net)
            row.update(tokens_per_s=tps, fits=p.fits, cache_slots=p.slots, hit_rate=p.hit_rate,
                       disk_floor_s=p.disk_s, memory_floor_s=p.memory_s, compute_floor_s=p.compute_s,
                       overhead_s=p.overhead_s, network_s=net, why=p.why)
        out["formats"][fmt] = row
    return out


def trace_hit_rate(trace: list[list[int]], slots: int, top_k: int, skip_calls: int) -> float | None:
    """The LFU cache's hit rate replaying ``trace`` after its first ``skip_calls`` calls; None when
    the cache cannot hold one layer's picks (predict then reports that it does not fit)."""
    from ..benchkit.cache_sim import replay_hit_rate

    if slots < top_k:
        return None
    return replay_hit_rate(trace, slots, "lfu", skip_calls=skip_calls)


def _gb(n: int | None) -> str:
    return "-" if n is None else (f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB")


def table(r: dict[str, Any], probe_note: str) -> str:
    ram = f"{r['ram_bytes'] / 2**30:.3g} GiB"
    at = ram + (f" x {r['nodes']} nodes" if r["nodes"] > 1 else "")
    lines = [f"{r['model']} ({r['model_type']}): {r['total_params'] / 1e9:.2f}B params, "
             f"{r['active_params'] / 1e9:.2f}B active per token ({r['active_params_no_embedding'] / 1e9:.2f}B without "
             f"the embedding table); {r['layers']} layers ({r['moe_layers']} MoE), {r['experts']} experts, top-{r['top_k']}"]
    lines += [f"note: {n}" for n in r["notes"]]
    s = r["stored"]
    if s:
        dt = ", ".join(f"{k} {_gb(v)}" for k, v in s["dtypes"].items())
        lines.append(f"files ({s['kind']}, {s['files']} file(s)): {s['tensor_bytes']:,} bytes of tensors "
                     f"({_gb(s['tensor_bytes'])}; routed experts {_gb(s['expert_bytes'])}; {dt})")
    head = ["format", "disk", "trunk RAM", "per expert", "active/token", "RAM for all", f"tok/s @ {at}",
            f"nodes of {ram}"]
    rows = []
    for fmt, f in r["formats"].items():
        tps = f.get("tokens_per_s")
        cell = "-" if "tokens_per_s" not in f else (f"{tps:.2f}" if tps is not None else "does not fit")
        rows.append([fmt, _gb(f["disk_bytes"]), _gb(f["trunk_ram_bytes"]), f"{f['expert_bytes'] / 2**20:.2f} MiB",
                     _gb(f["active_bytes_per_token"]), _gb(f["ram_to_hold_all_bytes"]), cell,
                     str(f["nodes_to_hold_all"] or "-")])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt_row = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines += ["", fmt_row(head)] + [fmt_row(row) for row in rows] + ["", probe_note]
    for fmt, f in r["formats"].items():
        if f.get("why"):
            lines.append(f"{fmt}: {f['why']}")
    return "\n".join(lines)


def _routing(path: Path) -> tuple[list[list[float]] | None, list[list[int]] | None]:
    """(counts, trace) from a routing JSON: {"counts": [[picks per expert] per MoE layer]} and/or
    {"trace": [[moe layer, expert, ...] per router call]} (bench/lazy.py records both)."""
    try:
        data = json.loads(path.read_text())
        counts = [[float(c) for c in layer] for layer in data["counts"]] if "counts" in data else None
        trace = [[int(v) for v in call] for call in data["trace"]] if "trace" in data else None
        if counts is None and trace is None:
            raise KeyError("counts or trace")
        if trace is not None and any(len(call) < 2 or min(call) < 0 for call in trace):
            raise ValueError("each trace entry is [moe layer, expert, ...] with non-negative ids")
        return counts, trace
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MoemeshError(f"{path}: not a routing profile ({{\"counts\": [[...], ...]}} or "
                           f"{{\"trace\": [[layer, expert, ...], ...]}}): {exc}") from None


def run(args: argparse.Namespace) -> int:
    from ..benchkit import probe as probe_mod
    from ..benchkit.known import KNOWN
    from ..experts.budget import parse_size

    if args.list:
        print("\n".join(KNOWN))
        return 0
    if not args.model:
        raise MoemeshError("plan needs a MODEL (a checkpoint dir, config.json, .gguf or one of: " + ", ".join(KNOWN) + ")")
    if args.nodes < 1:
        raise MoemeshError("--nodes must be at least 1")
    if args.rtt_ms < 0:
        raise MoemeshError("--rtt-ms must be 0 or more")
    if args.hit_rate is not None and not 0 <= args.hit_rate <= 1:
        raise MoemeshError("--hit-rate must be between 0 and 1")
    ram = parse_size(args.ram) if args.ram else probe_mod.total_ram()
    probe_path = Path(args.probe) if args.probe else probe_mod.default_path()
    probe = probe_mod.load(probe_path)
    if args.probe and probe is None:
        raise MoemeshError(f"{probe_path}: not a machine probe saved by `moemesh bench`")
    stale = None
    if probe is not None and not args.any_probe:
        from ..benchkit.probe_check import stale_reason

        stale = stale_reason(probe)
        probe = None if stale else probe  # no tok/s from another machine's (or an old) probe
    routing, trace = _routing(Path(args.routing)) if args.routing else (None, None)
    extra = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    r = plan(args.model, ram, args.nodes, probe, args.hit_rate, None if trace else routing, trace, args.rtt_ms / 1e3,
             extra_formats=extra)
    r["probe"] = str(probe_path) if probe else None
    r["probe_refused"] = stale
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    if stale:
        note = (f"tok/s: not predicted: {probe_path}: {stale}; run `moemesh bench --quick` on this machine "
                "(or --any-probe to use it anyway)")
    elif probe is None:
        note = f"tok/s: no machine probe at {probe_path}; run `moemesh bench --quick` first"
    else:
        d = max(m["bytes_s"] for m in probe["disk"]["measurements"])
        note = (f"tok/s from the probe of {probe['date']} (disk {d / 1e9:.2f} GB/s, memory "
                f"{probe['memory']['bytes_s'] / 1e9:.1f} GB/s, int4 {probe['matmul']['int4']['gflops']:.0f} GFLOP/s), "
                + (f"hit rate {args.hit_rate}" if args.hit_rate is not None else "routing profile " + args.routing
                   if args.routing else "uniform routing (worst case for the expert cache)")
                + "; sizes are moemesh's: bf16/int8/int4 = an expert store (bf16 trunk + one blob per expert); "
                  "MXFP4, Q*_K, FP8 ... = the file read in place (experts at their stored precision)")
        if args.nodes > 1:
            note += (f"\nmesh: a pipeline over {args.nodes} nodes; each token pays {args.nodes - 1} stage call(s) of "
                     f"~5 ms transport (hivemind on loopback, bench/results/mesh.md) + {args.rtt_ms:g} ms round trip")
    print(table(r, note))
    return 0
