"""bench/mesh.py --part capped: three small machines, one big model (issue 23).

A synthetic model with Qwen3-30B-A3B's per-layer shapes (benchkit/synth, random weights: routing
close to uniform, the hard case for a cache) about three times one node's memory cap, run

- by ONE node under the cap: ``load_model(store, --ram CAP)`` in a cgroup-v1 memory cgroup of CAP
  (page cache counted), experts streamed from disk into what the cap leaves;
- by THREE nodes, each in its own network namespace (a bridge, ``tc netem`` delay d on every
  node's egress: d per hop) and its own cgroup of the same CAP, ``mesh serve --layers auto --ram
  CAP``: the plan gives each node a third of the layers, so each caches a third of the experts;
  chained stages (API node -> stage 1 -> stage 2 -> API node: 3 hops per token).

Both decode the same teacher-forced pseudo-random token stream one token per step (warmup steps
untimed). Reported per configuration: decode tok/s, bytes on the wire per token (every node's
serialized messages), each node's expert-cache hit rate over the timed tokens, and the added
ms/token at delay d vs 0 (chained: 3 one-way hops per token; hub-and-spoke would be 2 round trips
= 4 hops). Roles ``api`` and ``single`` are this module run inside the namespace / cgroup.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moemesh.sysinfo import terminate

MIB = 2**20
SECRET = "bench-capped"
ADDR = re.compile(r"mesh address (/ip4/\S+)")


def token_stream(n: int, vocab: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(1000 + seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def decode(model, stream: list[int], warmup: int) -> list[float]:
    """Teacher-forced decode, one token per step -> seconds of each timed step."""
    import torch

    from moemesh.batch import BatchLayout

    cache = model.new_cache()
    cache.add_sequence(0)
    times = []
    for i, tok in enumerate(stream):
        t0 = time.perf_counter()
        model(torch.tensor([tok]), torch.tensor([i]), cache, BatchLayout([0], [1]))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    cache.free_sequence(0)
    return times


def cache_counts(provider) -> tuple[int, int, int]:
    s = provider.cache.stats
    return s.hits, s.misses, provider.cache.reader.bytes_read


# --- roles (run inside a namespace and a cgroup) --------------------------------------------------
def role_single(cfg: dict) -> dict:
    import torch

    from moemesh.benchkit.runner import apply_cap_to_self
    from moemesh.loading.experts import ExpertOptions
    from moemesh.loading.loader import load_model

    torch.set_num_threads(cfg["threads"])
    loaded = load_model(cfg["store"], "int4", experts=ExpertOptions(ram=cfg["cap"]))
    capped = apply_cap_to_self(cfg["cap"])
    h0, m0, b0 = cache_counts(loaded.provider)
    times = decode(loaded.model, cfg["stream"], cfg["warmup"])
    h1, m1, b1 = cache_counts(loaded.provider)
    return {"tok_s": len(times) / sum(times), "ms_per_token": 1000 * statistics.median(times),
            "hit_rate": (h1 - h0) / max(1, h1 - h0 + m1 - m0), "disk_mib_per_token": (b1 - b0) / MIB / len(times),
            "cap": capped, "budget": loaded.budget.__dict__}


def role_api(cfg: dict) -> dict:
    import torch

    from moemesh.mesh.stack import MeshStack, StackOptions
    from moemesh.mesh.transport.node import MeshOptions

    torch.set_num_threads(cfg["threads"])
    opts = MeshOptions(mesh_name="capped", secret=SECRET, host=cfg["host"], initial_peers=cfg["peers"],
                       heartbeat=2.0, call_timeout=120.0, test_delay_ms=cfg["delay"] if cfg["test_delay"] else 0.0)
    stack = MeshStack(StackOptions(cfg["store"], layers="auto", quant="int4", ram=cfg["cap"], mesh=opts)).start()
    try:
        deadline = time.monotonic() + 120
        while len(stack.live_nodes()) < cfg["nodes"]:
            if time.monotonic() > deadline:
                raise RuntimeError("the other nodes did not show up")
            time.sleep(0.5)
        # /sys/fs/cgroup is not visible inside `ip netns exec`: the driver lowers our cap, then says go
        print("LOADED", flush=True)
        while not Path(cfg["go_file"]).exists():
            time.sleep(0.2)
        plan = stack.pipeline.new_plan(force=True)
        before = _snapshot(stack)
        times = decode(stack.pipeline, cfg["stream"], cfg["warmup"])
        after = _snapshot(stack)
        n = len(times)
        wire = sum(a["bytes_sent"] - before["nodes"][p]["bytes_sent"] for p, a in after["nodes"].items()
                   if p in before["nodes"])
        hit = {}
        for p, a in after["nodes"].items():
            b = before["nodes"].get(p)
            if b is not None and "hits" in a:
                hit[p[-6:]] = (a["hits"] - b["hits"]) / max(1, a["hits"] + a["misses"] - b["hits"] - b["misses"])
        rows = [{"delay_ms": cfg["delay"], "tok_s": n / sum(times), "ms_per_token": 1000 * statistics.median(times),
                 "wire_bytes_per_token": wire / n, "hit_rate": hit, "tokens": n, "failovers": stack.pipeline.failovers}]
        print(json.dumps(rows[-1]), flush=True)
        return {"plan": [[s.start, s.end, s.peer[-6:] if s.peer else "api"] for s in plan], "rows": rows,
                "budget": stack.slice.budget.__dict__}
    finally:
        stack.stop()


def _snapshot(stack) -> dict:
    """Every node's counters from its membership record (fresh: waits two heartbeats), ours exact."""
    time.sleep(2 * stack.node.options.heartbeat + 0.5)
    nodes = {r.peer_id: dict(r.status) for r in stack.live_nodes()}
    me = stack.node.peer_id.to_base58()
    h, m, b = cache_counts(stack.slice.lazy_experts)
    nodes[me] = {"hits": h, "misses": m, "bytes_read": b, "bytes_sent": stack.node.stats.bytes_sent}
    return {"nodes": nodes}


# --- the driver ------------------------------------------------------------------------------------
def _role(role: str, cfg: dict, prefix: list[str], cap: int | None, headroom: int, log: Path, cgroups: bool):
    from moemesh.benchkit.netns import CgroupProcess

    cmd = [*prefix, sys.executable, str(Path(__file__).resolve()), role, json.dumps(cfg)]
    if cgroups:
        return CgroupProcess(cmd, cap + headroom, f"mesh-{role}", log)
    return _Plain(cmd, log)


class _Plain:
    """A process without a cgroup (no root): same interface as CgroupProcess."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def set_limit(self, limit: int) -> bool:
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc, grace_s=15)


def _wait(p, pattern: re.Pattern, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(p.output())
        if m:
            return m
        if p.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"node did not get ready:\n{p.output()[-3000:]}")


def _result(p, timeout: float) -> dict:
    m = _wait(p, re.compile(r"^RESULT (.*)$", re.M), timeout)
    return json.loads(m.group(1))


def run_capped(store: str, cap: int, tokens: int, warmup: int, delays: list[float], threads: int,
               headroom: int = 512 * MIB, timeout: float = 3600.0) -> dict:
    from moemesh.benchkit.netns import Namespaces, available
    from moemesh.benchkit.runner import drop_caches

    why = available()
    netns = why is None
    vocab = json.loads((Path(store) / "manifest.json").read_text())["config"]["vocab_size"]
    logdir = Path(tempfile.mkdtemp(prefix="mesh-capped-"))
    out: dict = {"cap_bytes": cap, "netns": netns, "why_not_netns": why, "tokens": tokens, "warmup": warmup,
                 "logs": str(logdir)}
    base = {"store": store, "cap": cap, "stream": token_stream(warmup + tokens, vocab), "warmup": warmup,
            "threads": threads}
    if netns:
        drop_caches()
    single = _role("single", base, [], cap, headroom, logdir / "single.log", netns)
    try:
        out["single"] = _result(single, timeout)
    finally:
        single.stop()
    print("single:", json.dumps(out["single"]), flush=True)
    ns = Namespaces(3) if netns else None
    out["mesh"] = {"rows": [], "usage": []}
    try:
        if ns is not None:
            ns.__enter__()
            out["delay_method"] = "netem" if ns.netem() else "test-delay (this kernel has no sch_netem)"
        else:
            out["delay_method"] = "test-delay"
        for delay in delays:  # a fresh mesh per delay: every configuration starts from cold caches
            res = _one_mesh(store, cap, headroom, delay, base, ns, logdir, threads, timeout)
            out["mesh"]["rows"] += res["rows"]
            out["mesh"]["plan"], out["mesh"]["budget"] = res["plan"], res["budget"]
            out["mesh"]["usage"].append(res.get("usage"))
    finally:
        if ns is not None:
            ns.__exit__(None, None, None)
    zero = next((r for r in out["mesh"]["rows"] if r["delay_ms"] == 0), None)
    for row in out["mesh"]["rows"]:
        row["speedup_vs_single"] = row["tok_s"] / out["single"]["tok_s"]
        row["hops_per_token"] = len([s for s in out["mesh"]["plan"] if s[2] != "api"]) + 1
        if zero is not None:
            row["added_ms_per_token"] = row["ms_per_token"] - zero["ms_per_token"]
    return out


def _one_mesh(store: str, cap: int, headroom: int, delay: float, base: dict, ns, logdir: Path, threads: int,
              timeout: float) -> dict:
    """Two stage nodes and the API role, each in its namespace and cgroup (when ``ns``), at ``delay``
    ms per hop (netem, or the transport's test delay where the kernel lacks netem)."""
    from moemesh.benchkit.netns import CgroupProcess
    from moemesh.benchkit.runner import drop_caches

    netem = ns is not None and ns.netem()
    if ns is not None:
        ns.set_delay(delay if netem else 0)
        drop_caches()
    test_delay = [] if netem else ["--test-delay-ms", str(delay)]
    host = (lambda i: ns.addr(i)) if ns is not None else (lambda i: "127.0.0.1")
    prefix = (lambda i: ns.exec_prefix(i)) if ns is not None else (lambda i: [])
    procs, peers = [], []
    tag = f"d{delay:g}"
    try:
        for i in (1, 2):
            cmd = [*prefix(i), sys.executable, "-m", "moemesh.cli", "mesh", "serve", store, "--layers", "auto",
                   "--ram", str(cap), "--quant", "int4", "--no-api", "--host", host(i), "--port", str(4000 + i),
                   "--threads", str(threads), "--heartbeat", "2", "--call-timeout", "120", "--secret", SECRET,
                   "--mesh-name", "capped", *test_delay, *[a for p in peers for a in ("--peer", p)]]
            log = logdir / f"node{i}-{tag}.log"
            p = CgroupProcess(cmd, cap + headroom, f"mesh-node{i}", log) if ns is not None else _Plain(cmd, log)
            procs.append(p)
            peers.append(_wait(p, ADDR, 600).group(1))
            if not p.set_limit(cap):  # loaded: from here on the node lives within its cap
                raise RuntimeError(f"node {i} uses more than the cap after loading: {p.usage()}")
        go = logdir / f"go-{tag}"
        api_cfg = {**base, "host": host(0), "peers": peers, "nodes": 3, "delay": delay, "test_delay": not netem,
                   "go_file": str(go)}
        api = _role("api", api_cfg, prefix(0), cap, headroom, logdir / f"api-{tag}.log", ns is not None)
        procs.append(api)
        _wait(api, re.compile("^LOADED$", re.M), 600)
        if not api.set_limit(cap):
            raise RuntimeError(f"the API node uses more than the cap after loading: {api.usage()}")
        for p in procs if ns is not None else []:
            p.reset_peak()
        go.touch()
        res = _result(api, timeout)
        if ns is not None:  # peak memory of each node while decoding, against its cap
            res["usage"] = {f"node{i}": p.usage() for i, p in enumerate(procs)}
        return res
    finally:
        for p in procs:
            p.stop()


def markdown(res: dict) -> list[str]:
    s = res["single"]
    lines = ["", "## Three capped nodes vs one (issue 23)", "",
             f"{res['model']}; cap {res['cap_bytes'] / MIB:.0f} MiB per node (cgroup-v1, page cache counted"
             f"{'' if res['netns'] else '; NOT APPLIED: ' + str(res['why_not_netns'])}), model "
             f"{res['model_bytes'] / MIB:.0f} MiB; {res['tokens']} teacher-forced tokens after {res['warmup']} "
             f"warmup; plan {res['mesh']['plan']}." + (f" Load average {res['loadavg'][0]:.1f} at start, "
             f"{res['loadavg'][1]:.1f} at the end: the 2-core machine was shared with other jobs (helpers' test "
             "suites), so every node and the single node ran on oversubscribed cores." if "loadavg" in res else ""), "",
             f"One node: {s['tok_s']:.2f} tok/s, hit rate {s['hit_rate']:.3f}, {s['disk_mib_per_token']:.0f} MiB "
             "read per token.", "",
             "| delay ms per hop | mesh tok/s | x one node | wire bytes/token | hit rate per node | added ms/token "
             "vs 0 ms | hops/token |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in res["mesh"]["rows"]:
        hits = ", ".join(f"{k}={v:.3f}" for k, v in r["hit_rate"].items())
        lines.append(f"| {r['delay_ms']:g} | {r['tok_s']:.2f} | {r['speedup_vs_single']:.2f} | "
                     f"{r['wire_bytes_per_token']:.0f} | {hits} | {r.get('added_ms_per_token', 0):.1f} | "
                     f"{r.get('hops_per_token', '-')} |")
    lines += ["", "Goals: >= 2x one node at 0-5 ms, >= 1x at 20 ms; added ms/token <= one round trip per remote "
              "stage (2 x delay x stages; chained stages cost 3 one-way hops per token)."]
    return lines


if __name__ == "__main__":
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    result = role_single(cfg) if role == "single" else role_api(cfg)
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the mesh loop and the daemon are gone; do not wait on leftover threads
