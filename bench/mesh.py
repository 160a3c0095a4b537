"""Mesh benchmarks. ``--part pipeline`` (loopback): per-token overhead of 2 and 3 stages, and decode
speed with added per-hop latency. ``--part experts``: bytes per token of expert shards. ``--part
capped`` (bench/mesh_capped.py): three nodes in their own network namespaces (tc netem delay per
hop) and memory cgroups vs one node under the same cap, on a model ~3x the cap. ``--part wire``
(bench/mesh_wire.py): what a bf16 wire does to the logits. ``--quick``: small sizes, to check that
everything runs (not for publishing).

Pipeline topology: this process is the API node (embedding, head, its own layers); stage nodes are
child processes (``moemesh mesh serve --no-api``). Stages are chained: the API node sends a step
to the first remote stage, each stage passes its output to the next, the last one answers the API
node: with 2 stages 2 one-way hops per token, with 3 stages 3 (hub and spoke would be 4).
"Per-hop latency d" is a TEST-ONLY delay of d ms on every link message (MeshOptions.test_delay_ms).

Expert shards (``--part experts``): every node holds the trunk and 1/n of the experts; the API
node (this process) sends each MoE layer's rows routed elsewhere to their holders. We count the
serialized message bytes (headers + tensors, both directions, fp32 wire) per decoded token. The
model is a random qwen3_moe with Qwen3-30B-A3B's routing shape (hidden 2048, 128 experts, top-8)
but narrow experts and 2 layers: bytes on the wire depend on hidden size, top-k, shard count and
routing, not on expert width; per MoE layer figures scale linearly with the layer count.

Each configuration decodes --tokens tokens greedily (ignore EOS) after a short prompt; we report
the median over --rounds of the decode time per token (prefill excluded), one torch thread per
process, and overhead = mesh ms/token - single-process ms/token (single process measured in the
same run, interleaved). Writes bench/results/mesh.{json,md}.

    .venv/bin/python bench/mesh.py [--model smollm2] [--tokens 32] [--rounds 3] [--part all|pipeline|experts]
    .venv/bin/python bench/mesh.py --part capped [--capped-layers 12] [--cap-mib N] [--delays 0,5,20]  # root
    .venv/bin/python bench/mesh.py --part wire [--wire-models smollm2,~/.cache/moemesh/smollm2-moe-16x15]
    .venv/bin/python bench/mesh.py --quick --part capped   # a few minutes: checks it runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from moemesh.benchkit.results import write_results
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.mesh.launcher import MeshProcess, StageProcess
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.node import CallStats, MeshOptions

RESULTS = Path(__file__).parent / "results"
SECRET = "bench-secret"
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 2379, 30, 2]


def ms_per_token(model, tokens: int) -> float:
    """Decode time per token of one greedy request (prefill excluded)."""
    engine = Engine(model)
    seq = engine.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=tokens))
    seq.stop_token_ids = frozenset()
    while engine.has_work():
        engine.step()
    return 1000 * seq.decode_seconds / (len(seq.output_ids) - 1)


def interleaved(single, mesh, tokens: int, rounds: int) -> tuple[list[float], list[float]]:
    """Alternate single / mesh runs so a burst of load from other processes hits both."""
    a, b = [], []
    for _ in range(rounds):
        a.append(ms_per_token(single, tokens))
        b.append(ms_per_token(mesh, tokens))
    return a, b


EXPERT_SHAPE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                    num_experts_per_tok=8, moe_intermediate_size=32, intermediate_size=64, num_hidden_layers=2,
                    vocab_size=8192, norm_topk_prob=True, max_position_embeddings=512)


def expert_model(root: Path) -> Path:
    """The random qwen3_moe above, made once under ``root``."""
    import sys

    from transformers import Qwen3MoeConfig

    out = root / "qwen3moe-a3b-routing-L2"
    if not (out / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
        from tiny import make_checkpoint

        make_checkpoint(Qwen3MoeConfig(**EXPERT_SHAPE), out, seed=0)
    return out


def expert_shards(model: Path, tokens: int, shard_counts: list[int]) -> list[dict]:
    """Bytes per decoded token crossing the network in expert-shard mode, n nodes of 1/n experts."""
    from moemesh.mesh.shards.masked import shard_experts

    rows = []
    e, k, layers, d = (EXPERT_SHAPE[x] for x in ("num_experts", "num_experts_per_tok", "num_hidden_layers", "hidden_size"))
    for n in shard_counts:
        shares = [f"{s[0]}:{s[-1] + 1}" for s in shard_experts(e, n)]
        head = MeshStack(StackOptions(str(model), None, "fp32", experts=shares[0], mesh=MeshOptions(
            mesh_name="bench-experts", secret=SECRET, heartbeat=2.0, call_timeout=30.0))).start()
        others = [MeshProcess(str(model), "--no-api", "--experts", share, "--quant", "fp32", "--threads", "1",
                              "--heartbeat", "2", "--secret", SECRET, "--mesh-name", "bench-experts",
                              *[a for p in head.addrs() for a in ("--peer", p)]).launch()
                  for share in shares[1:]]
        try:
            for o in others:
                o.wait_ready(300)
            deadline = time.monotonic() + 60
            while len(head.live_nodes()) < n and time.monotonic() < deadline:
                time.sleep(0.2)
            engine = Engine(head.pipeline)
            # sampled, not greedy: greedy decoding of random weights repeats itself, and so its routing
            seq = engine.add_request(PROMPT, SamplingParams(temperature=1.0, seed=0, max_tokens=tokens))
            seq.stop_token_ids = frozenset()
            engine.step()  # prefill (the whole prompt in one step) + the first token
            st = head.node.stats
            sent0, recv0, calls0 = st.bytes_sent, st.bytes_received, st.calls
            wall0, comp0 = st.wall_s, st.remote_compute_s
            while engine.has_work():
                engine.step()
            decoded = len(seq.output_ids) - 1
            moved = (st.bytes_sent - sent0) + (st.bytes_received - recv0)
            calls = st.calls - calls0
            row = {"nodes": n, "experts_per_node": e // n, "hidden": d, "top_k": k, "moe_layers": layers,
                   "decode_tokens": decoded, "bytes_per_token": round(moved / decoded),
                   "sent_per_token": round((st.bytes_sent - sent0) / decoded),
                   "received_per_token": round((st.bytes_received - recv0) / decoded),
                   "bytes_per_token_per_moe_layer": round(moved / decoded / layers),
                   "calls_per_token": round(calls / decoded, 2),
                   "transport_ms_per_call": round(1000 * ((st.wall_s - wall0) - (st.remote_compute_s - comp0))
                                                  / max(1, calls), 2),
                   "mesh_ms_per_token": round(1000 * seq.decode_seconds / decoded, 2),
                   "remote_fraction": round(head.remote_experts.remote_rows
                                            / max(1, head.remote_experts.remote_rows + head.remote_experts.local_rows), 3),
                   "load_avg_1m": round(os.getloadavg()[0], 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        finally:
            for o in others:
                o.stop()
            head.stop()
    return rows


def markdown(results: dict) -> str:
    lines = []
    chained = results.get("protocol") == "chained"  # rows measured since stages are chained (issue 23)
    if results.get("configs"):
        lines += [f"# Mesh pipeline on loopback: {results['model']} ({results['num_layers']} layers)", "",
                  f"{results['machine']}; {results['tokens']} greedy decode tokens, median of {results['rounds']} "
                  + ("rounds; added latency is per hop (test-only delay on every link message; chained stages: "
                     "2 hops per token with 2 stages, 3 with 3)." if chained else
                     "rounds; MEASURED BEFORE CHAINING (issue 23): hub and spoke, one unary call per remote stage "
                     "per token, added latency per stage round trip (test-only delay before each call)."), "",
                  f"| config | added latency ms per {'hop' if chained else 'round trip'} | single ms/tok | mesh ms/tok | "
                  f"overhead ms/tok | mesh tok/s | min single / mesh ms | transport ms/{'step' if chained else 'call'} | "
                  "load avg |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["configs"]:
            lines.append(f"| {r['config']} | {r['delay_ms']:g} | {r['single_ms_per_token']} | {r['mesh_ms_per_token']} | "
                         f"{r['overhead_ms_per_token']} | {r['mesh_tokens_per_s']} | {r['single_min_ms']} / "
                         f"{r['mesh_min_ms']} | {r['transport_ms_per_call']} | {r['load_avg_1m']} |")
        transport = ("transport ms/step = a chained step's wall time minus the compute every stage of the chain "
                     "reports" if chained else "transport ms/call = stage call wall time minus the compute time the "
                     "stage reports")
        lines += ["", transport + " (delays included): the number that does not depend on how busy the CPU is. On a "
                  "heavily shared machine (load avg above) 'mesh faster than single' is a scheduling artefact: two "
                  "processes that take turns sleeping get CPU sooner than one always-runnable process; compare "
                  "transport times, not totals.",
                  "", "Command: `.venv/bin/python bench/mesh.py --part pipeline` "
                  f"(--tokens {results['tokens']} --rounds {results['rounds']})"]
    ex = results.get("expert_shards")
    if ex:
        lines += ["", "## Expert shards: bytes per token on the network", "",
                  f"{ex['model']}; every node holds the trunk and 1/n of the experts, fp32 wire (exact); "
                  f"{ex['tokens']} sampled decode tokens (temperature 1, seed 0) after an {len(PROMPT)}-token prompt. Bytes = serialized "
                  "messages (msgpack header + raw tensors) both ways, counted by the API node; libp2p framing and "
                  "encryption not included.", "",
                  "| nodes | experts/node | hidden | top-k | MoE layers | bytes/token | per MoE layer | sent / received "
                  "per token | calls/token | rows remote | transport ms/call | mesh ms/token | load avg |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in ex["rows"]:
            lines.append(f"| {r['nodes']} | {r['experts_per_node']} | {r['hidden']} | {r['top_k']} | {r['moe_layers']} | "
                         f"{r['bytes_per_token']} | {r['bytes_per_token_per_moe_layer']} | {r['sent_per_token']} / "
                         f"{r['received_per_token']} | {r['calls_per_token']} | {r['remote_fraction']} | "
                         f"{r['transport_ms_per_call']} | {r['mesh_ms_per_token']} | {r['load_avg_1m']} |")
        lines += ["", "One call per peer per MoE layer: the token's hidden row goes once to each peer holding any of "
                  "its experts; one weighted row per (token, expert) comes back, unsummed, so the API node adds them "
                  "in expert-id order exactly as one process does. A 48-layer model of this shape (Qwen3-30B-A3B) "
                  "moves 48 x the per-MoE-layer figure per token.", "",
                  f"Command: `.venv/bin/python bench/mesh.py --part experts --tokens {ex['tokens']}`"]
    if results.get("capped"):
        import mesh_capped

        lines += mesh_capped.markdown(results["capped"])
    if results.get("wire"):
        import mesh_wire

        lines += mesh_wire.markdown(results["wire"])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delays", default="0,5,20,30")
    ap.add_argument("--part", choices=("all", "pipeline", "experts", "capped", "wire"), default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that the part runs")
    ap.add_argument("--capped-layers", type=int, default=12, help="capped: depth of the Qwen3-30B-A3B-shaped model")
    ap.add_argument("--capped-vocab", type=int, default=32768)
    ap.add_argument("--cap-mib", type=int, default=None, help="capped: per-node cap (default: model bytes / 3)")
    ap.add_argument("--warmup", type=int, default=8, help="capped: untimed tokens first")
    ap.add_argument("--wire-models", default="smollm2", help="wire: comma-separated models (real weights)")
    ap.add_argument("--shards", default="2,3", help="expert-shard node counts")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/moemesh/bench"),
                    help="where the expert-shard model (and --quick's capped model) is made once")
    ap.add_argument("--work-dir", default="/work/bench-data",
                    help="capped: where the synthetic Qwen3 lives (bench/lazy.py's and bench/decode.py's, shared)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    old = json.loads((RESULTS / "mesh.json").read_text()) if (RESULTS / "mesh.json").exists() else {}
    if args.part in ("capped", "wire"):
        return other_part(args, old)
    if args.quick:
        args.tokens, args.rounds, args.delays, args.shards = 8, 1, "0,20", "3"
    if args.part == "experts":
        model = expert_model(Path(args.work))
        old["expert_shards"] = {"model": "random qwen3_moe, hidden 2048, 128 experts, top-8, 2 layers",
                                "tokens": args.tokens,
                                "rows": expert_shards(model, args.tokens, [int(x) for x in args.shards.split(",")])}
        write_results(RESULTS, "mesh_quick" if args.quick else "mesh", old, markdown(old), sys.argv)  # the pipeline rows kept
        return
    single = load_model(args.model).model
    n = single.args.num_layers
    cuts2, cuts3 = [0, n // 2, n], [0, n // 3, 2 * n // 3, n]
    results: dict = {"model": args.model, "num_layers": n, "tokens": args.tokens, "rounds": args.rounds,
                     "protocol": "chained",
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread per process",
                     "configs": []}

    def run(label: str, cuts: list[int], delays: list[float]) -> None:
        for d in delays:  # fresh nodes per delay: every node delays its own messages (d per hop)
            head = MeshStack(StackOptions(args.model, f"{cuts[0]}:{cuts[1]}", mesh=MeshOptions(
                mesh_name="bench", secret=SECRET, heartbeat=2.0, test_delay_ms=d))).start()
            stages = [StageProcess(args.model, f"{a}:{b}", SECRET, head.addrs(), "--threads", "1", "--heartbeat", "2",
                                   "--test-delay-ms", str(d), mesh_name="bench").launch()
                      for a, b in zip(cuts[1:-1], cuts[2:])]
            try:
                for s in stages:
                    s.wait_ready(300)
                while len(head.live_nodes()) < len(cuts) - 1:
                    time.sleep(0.2)
                head.pipeline.new_plan(force=True)
                head.node.stats = CallStats()
                singles, meshes = interleaved(single, head.pipeline, args.tokens, args.rounds)
                st = head.node.stats
                transport = 1000 * (st.wall_s - st.remote_compute_s) / max(1, st.calls)  # per chained step
                base, mesh = statistics.median(singles), statistics.median(meshes)
                row = {"config": label, "stages": len(cuts) - 1, "delay_ms": d, "single_ms_per_token": round(base, 2),
                       "mesh_ms_per_token": round(mesh, 2), "overhead_ms_per_token": round(mesh - base, 2),
                       "mesh_tokens_per_s": round(1000 / mesh, 1), "single_tokens_per_s": round(1000 / base, 1),
                       "single_min_ms": round(min(singles), 2), "mesh_min_ms": round(min(meshes), 2),
                       "load_avg_1m": round(os.getloadavg()[0], 1),
                       "transport_ms_per_call": round(transport, 2), "hops_per_token": len(cuts) - 1}
                print(json.dumps(row), flush=True)
                results["configs"].append(row)
            finally:
                for s in stages:
                    s.stop()
                head.stop()

    delays = [float(d) for d in args.delays.split(",")]
    run("2 stages", cuts2, delays)
    run("3 stages", cuts3, delays)  # chained: 3 hops per token (hub and spoke would be 4)
    if args.part == "all":
        model = expert_model(Path(args.work))
        results["expert_shards"] = {"model": "random qwen3_moe, hidden 2048, 128 experts, top-8, 2 layers",
                                    "tokens": args.tokens,
                                    "rows": expert_shards(model, args.tokens, [int(x) for x in args.shards.split(",")])}
    elif "expert_shards" in old:
        results["expert_shards"] = old["expert_shards"]
    results.update({k: old[k] for k in ("capped", "wire") if k in old})  # the other parts' results kept
    write_results(RESULTS, "mesh_quick" if args.quick else "mesh", results, markdown(results), sys.argv)


def other_part(args, old: dict) -> None:
    """--part capped / wire: their results go into mesh.json beside the others (kept)."""
    sys.path.insert(0, str(Path(__file__).parent))
    if args.part == "wire":
        import mesh_wire

        models = args.wire_models.split(",")
        old["wire"] = [row for m in models for row in mesh_wire.wire_effect(os.path.expanduser(m),
                                                                            8 if args.quick else 48)]
    else:
        import mesh_capped
        from moemesh.benchkit.synth import core as synth

        layers, vocab = (4, 4096) if args.quick else (args.capped_layers, args.capped_vocab)
        store = synth.build(Path(args.work if args.quick else args.work_dir), layers, vocab) / "store"
        model_bytes = sum(f.stat().st_size for f in store.iterdir() if f.suffix in (".bin", ".safetensors"))
        cap = args.cap_mib * 2**20 if args.cap_mib else model_bytes // 3
        cap = max(cap, 600 * 2**20 if args.quick else cap)  # quick: the smallest budget that loads
        tokens, warmup = (6, 2) if args.quick else (args.tokens, args.warmup)
        delays = [0.0, 5.0] if args.quick else [float(d) for d in args.delays.split(",")]
        load0 = os.getloadavg()[0]
        res = mesh_capped.run_capped(str(store), cap, tokens, warmup, delays, threads=1)
        res.update(model=f"synthetic Qwen3-30B-A3B shapes, {layers} layers, vocab {vocab}", model_bytes=model_bytes,
                   loadavg=[load0, os.getloadavg()[0]], command=" ".join(sys.argv))
        old["capped"] = res
    write_results(RESULTS, "mesh_quick" if args.quick else "mesh", old, markdown(old), sys.argv)


if __name__ == "__main__":
    main()
