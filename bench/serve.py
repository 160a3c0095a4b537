"""Serving benchmark: 1, 4 and 8 concurrent streaming clients over real HTTP against ``moemesh
serve``, and the same requests on the engine driven directly in this process.

Every request decodes exactly --max-tokens tokens (ignore_eos), greedy, from distinct chat
prompts. Rounds alternate engine / HTTP so a burst of load from other processes on this shared
machine hits both. Reported per concurrency (median over rounds): aggregate tokens/s, time to
first token p50/p95, inter-token latency (mean gap per stream), CPU per token, and the HTTP
layer's added time per token = (HTTP wall - engine wall) / tokens per stream, plus its CPU time
measured directly (server CPU outside the engine thread). Writes bench/results/serve.{json,md}.

    .venv/bin/python bench/serve.py [--model smollm2] [--threads 1] [--max-tokens 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from moemesh.benchkit.results import write_results
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.server.launcher import ServerProcess

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the sea", "a cat", "Paris", "robots", "winter", "coffee", "a lighthouse", "the moon"]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarize(wall: float, cpu: float, tokens: int, ttfts: list[float], itls: list[float]) -> dict:
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tok_s": tokens / wall,
            "cpu_ms_per_token": cpu / tokens * 1e3, "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p95_s": percentile(ttfts, 0.95),
            "itl_mean_s": statistics.mean(itls)}


def _cpu_seconds(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()  # utime, stime: fields 14, 15 of stat
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int, port: int) -> tuple[float, float]:
    """(whole server process from /proc, its engine thread from /metrics) CPU seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    engine = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("moemesh_engine_cpu_seconds_total{"))
    return _cpu_seconds(Path(f"/proc/{pid}/stat")), engine


def run_engine(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """The requests added at once and stepped to the end in this thread: no HTTP, no asyncio."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    c0 = time.process_time()
    t0 = time.perf_counter()
    seqs = [engine.add_request(p, params) for p in prompts]
    for s in seqs:
        s.stop_token_ids = frozenset()  # what the server's ignore_eos does
    stamps: dict[int, list[float]] = {s.seq_id: [] for s in seqs}
    while engine.has_work():
        for out in engine.step():
            if out.new_token is not None:
                stamps[out.seq.seq_id].append(time.perf_counter())
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    ttfts = [t[0] - t0 for t in stamps.values()]
    itls = [(t[-1] - t[0]) / (len(t) - 1) for t in stamps.values()]
    return summarize(wall, cpu, sum(len(t) for t in stamps.values()), ttfts, itls)


def stream_once(port: int, i: int, max_tokens: int, start: threading.Barrier, out: list) -> None:
    """One streaming chat request over a fresh HTTP connection; records content-chunk times."""
    body = json.dumps({"messages": messages(i), "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start.wait()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    stamps, tokens = [], 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    conn.close()
    out.append((t0, stamps, tokens))


def run_http(port: int, pid: int, concurrency: int, max_tokens: int) -> dict:
    start = threading.Barrier(concurrency + 1)
    results: list = []
    threads = [threading.Thread(target=stream_once, args=(port, i, max_tokens, start, results))
               for i in range(concurrency)]
    for t in threads:
        t.start()
    c0, e0 = server_cpu_seconds(pid, port)
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    c1, e1 = server_cpu_seconds(pid, port)
    cpu, outside_engine = c1 - c0, (c1 - c0) - (e1 - e0)  # the server's CPU only, not these client threads
    ttfts = [stamps[0] - sent for sent, stamps, _ in results]
    itls = [(stamps[-1] - stamps[0]) / (len(stamps) - 1) for _, stamps, _ in results]
    tokens = sum(n for _, _, n in results)
    summary = summarize(wall, cpu, tokens, ttfts, itls)
    return {**summary, "cpu_outside_engine_ms_per_token": outside_engine / tokens * 1e3}


def best_of(runs: list[dict]) -> dict:
    """The round with the highest throughput: other processes' load only ever slows a run down."""
    return max(runs, key=lambda r: r["tok_s"])


def aggregate(runs: dict[int, dict[str, list[dict]]], max_tokens: int) -> list[dict]:
    """Per concurrency: best round of each path, and the HTTP layer's added time as the median of
    per-round differences (engine and HTTP ran back to back, so slow load drift cancels)."""
    rows = []
    for c, paths in sorted(runs.items()):
        pairs = list(zip(paths["engine"], paths["http"]))
        rows.append({
            "concurrency": c, "engine": best_of(paths["engine"]), "http": best_of(paths["http"]),
            "http_added_ms_per_token": statistics.median((h["wall_s"] - e["wall_s"]) / max_tokens * 1e3
                                                         for e, h in pairs),
            "http_added_cpu_ms_per_token": statistics.median(h["cpu_ms_per_token"] - e["cpu_ms_per_token"]
                                                             for e, h in pairs),
            "http_cpu_outside_engine_ms_per_token": statistics.median(
                h["cpu_outside_engine_ms_per_token"] for h in paths["http"]),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(messages(i))) for i in range(max(levels))]
    engine = Engine(loaded.model, stop_token_ids=frozenset(tok.eos_token_ids), max_batch=max(levels))
    load_before = os.getloadavg()
    runs: dict[int, dict[str, list[dict]]] = {c: {"engine": [], "http": []} for c in levels}
    with ServerProcess(args.model, "--threads", str(args.threads), "--max-batch", str(max(levels))) as server:
        pid = server.pid
        assert pid is not None
        run_http(server.port, pid, 1, 4)  # warm-up: first-request costs are not serving costs
        run_engine(engine, prompts[:1], 4)
        for r in range(args.rounds):
            for c in levels:
                runs[c]["engine"].append(run_engine(engine, prompts[:c], args.max_tokens))
                runs[c]["http"].append(run_http(server.port, pid, c, args.max_tokens))
                print(f"round {r + 1} c={c}: engine {runs[c]['engine'][-1]['tok_s']:.1f} tok/s, "
                      f"http {runs[c]['http'][-1]['tok_s']:.1f} tok/s", flush=True)
    rows = aggregate(runs, args.max_tokens)
    report = {"model": args.model, "threads": args.threads, "max_tokens": args.max_tokens, "rounds": args.rounds,
              "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": rows,
              "raw": {str(c): runs[c] for c in levels},
              "command": f"bench/serve.py --model {args.model} --threads {args.threads} "
                         f"--max-tokens {args.max_tokens} --concurrency {args.concurrency} --rounds {args.rounds}"}
    write_results(RESULTS, "serve", report, markdown(report), sys.argv)  # report's own machine/command kept
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"# Serving benchmark: {report['model']}, {report['threads']} torch thread(s), "
        f"{report['max_tokens']} tokens per stream, {report['rounds']} rounds",
        "",
        f"`{report['command']}`; load average before/after {report['loadavg_before'][0]:.1f}/"
        f"{report['loadavg_after'][0]:.1f} on {report['cpu_count']} cores (shared machine).",
        "",
        "| clients | path | tok/s (all streams) | TTFT p50 ms | TTFT p95 ms | ITL ms | CPU ms/token "
        "| HTTP added wall ms/token | HTTP added CPU ms/token | server CPU outside engine thread ms/token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["results"]:
        for path in ("engine", "http"):
            r = row[path]
            added = (f"{row['http_added_ms_per_token']:.2f} | {row['http_added_cpu_ms_per_token']:.2f} | "
                     f"{row['http_cpu_outside_engine_ms_per_token']:.2f}" if path == "http" else " | | ")
            lines.append(f"| {row['concurrency']} | {path} | {r['tok_s']:.1f} | {r['ttft_p50_s'] * 1e3:.0f} | "
                         f"{r['ttft_p95_s'] * 1e3:.0f} | {r['itl_mean_s'] * 1e3:.1f} | {r['cpu_ms_per_token']:.2f} | "
                         f"{added} |")
    lines += ["", "Per path the best of the rounds (other processes' load only slows a run down); the three "
              "HTTP-added columns are medians over rounds of per-round differences (engine and HTTP ran "
              "back to back).", "",
              "engine = the same requests on `Engine.step()` in the benchmark's own process (no HTTP, no "
              "asyncio, no engine thread); http = streaming clients over loopback HTTP to `moemesh serve`. "
              "HTTP added wall ms/token = (HTTP wall - engine wall) / tokens per stream: the time the server "
              "layer (HTTP, JSON, SSE, the engine thread hand-off, detokenizing) adds to each decode step. "
              "CPU ms/token = CPU time (all threads) of the process doing the work per generated token: the "
              "benchmark process for engine, the server process for http (its clients excluded). Server CPU "
              "outside the engine thread = the HTTP layer's own work (uvicorn, routes, detokenizing, parsing, "
              "JSON, SSE): the process's CPU (/proc) minus the engine thread's "
              "(moemesh_engine_cpu_seconds_total). On a shared, loaded machine wall times swing with other "
              "processes' load; CPU times much less.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
