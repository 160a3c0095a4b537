"""Soak: `moemesh serve` of a lazy MoE under --ram, under a seeded mix of load for a while, its
memory watched (issue 20 item 4).

The load (moemesh.benchkit.soak): plain and streamed chat, tool calls, completions, Anthropic
messages, overlong prompts, bad bodies, clients that leave mid-stream, and bursts past the queue,
from a few loopback clients. Reported: requests and outcomes by kind (explained: success, the 400
a bad or overlong request deserves, 429 when busy, a disconnect the client chose; anything else is
unexplained, and each unexplained outcome keeps what was seen: status, error body or event,
exception, the stream's last bytes), p50/p99 latency of successful requests, the server's RSS at
start / end / max and its least-squares slope per hour after warm-up, and the prefix cache's slabs
(a bounded cache, from /metrics) with the slope of RSS less them. Results: bench/results/soak.{json,md}.

    .venv/bin/python bench/soak.py                   # the benchmark: 2 hours
    .venv/bin/python bench/soak.py --duration 1800   # the slow test's length
    .venv/bin/python bench/soak.py --quick           # 30 s, results to soak_quick.{json,md}
    .venv/bin/python bench/soak.py --duration 300 --prefix-cache 2M --out /tmp/x  # the cache fills: RSS levels off
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from moemesh.benchkit.chat_moe import build_chat_moe_store
from moemesh.benchkit.results import write_results
from moemesh.benchkit.soak import Soak, SoakConfig
from moemesh.benchkit.soak_report import markdown
from moemesh.server.launcher import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=7200.0, help="seconds of load (default 7200: 2 hours)")
    p.add_argument("--quick", action="store_true", help="30 s, written as soak_quick.{json,md}")
    p.add_argument("--store", default=None, help="an expert store to serve (default: a small random chat MoE)")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "moemesh-soak"),
                   help="where the default store is built (reused)")
    p.add_argument("--ram", default="600M", help="the server's --ram (default 600M)")
    p.add_argument("--workers", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--queue-size", type=int, default=6, help="the server's --queue-size (bursts go past it)")
    p.add_argument("--burst-every", type=float, default=20.0, help="seconds between bursts (default 20)")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads (default 1)")
    p.add_argument("--prefix-cache", default="auto", help="the server's --prefix-cache (default auto: its share of "
                   "--ram); a small one fills during a short run, showing where RSS levels off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args(argv)
    duration = 30.0 if args.quick else args.duration
    store = Path(args.store) if args.store else build_chat_moe_store(args.work_dir)
    config = SoakConfig(duration=duration, workers=args.workers, burst_every=args.burst_every,
                        burst_size=2 * args.queue_size, seed=args.seed)
    server = ServerProcess(str(store), "--ram", args.ram, "--threads", str(args.threads), "--queue-size",
                           str(args.queue_size), "--max-batch", "4", "--prefix-cache", args.prefix_cache).start(timeout=600)
    try:
        context = server.get_json("/v1/models")["data"][0]["max_model_len"]
        report = Soak(server.host, server.port or 0, server.pid or 0, context, config).run()
        alive = server._proc is not None and server._proc.poll() is None
        health = server.get_json("/health")["status"] if alive else "dead"
    finally:
        server.stop()
    summary = report.summary(warmup=min(60.0, duration / 5))
    payload = {"store": str(store), "ram": args.ram, "prefix_cache": args.prefix_cache, "config": config.__dict__,
               "server_alive_at_end": alive,
               "health_at_end": health, **summary,
               "rss_samples_mib": [(round(t, 1), round(b / 2**20, 1)) for t, b in report.rss],
               "prefix_cache_samples_mib": [(round(t, 1), round(b / 2**20, 1)) for t, b in report.prefix]}
    name = "soak_quick" if args.quick else "soak"
    md = markdown(summary, f"Soak: moemesh serve of a lazy MoE under --ram {args.ram}, {duration:g} s")
    md += f"\nserver alive at the end: {alive}, /health: {health}\n"
    write_results(args.out, name, payload, md, sys.argv)
    print(md)
    return 0 if alive and health == "ok" and summary["unexplained"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
