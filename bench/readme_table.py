"""The README's performance table, generated from bench/results/*.json (never typed by hand).

One row per (benchmark, configuration, peer): moemesh (and moemesh --compile where the run has it)
and the peer measured in the same run (llama.cpp; transformers in the lazy_hf* runs), their
ratio, the physical floors of a token (disk: the bytes moemesh read at the run's best measured
O_DIRECT bandwidth; memory and compute: `moemesh plan`'s floors from the machine probe), the
machine and the command that reproduces the row. Rewrites the block between the markers in
README.md (``--check`` only reports whether it is up to date).

    .venv/bin/python bench/readme_table.py [--check]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
LAZY = {"lazy": "Qwen3-30B-A3B shapes", "lazy_gpt-oss-120b": "gpt-oss-120b shapes",
        "lazy_mixtral-8x7b": "Mixtral-8x7B shapes", "lazy_deepseek-v3": "DeepSeek-V3 shapes",
        "lazy_hf": "Qwen3-30B-A3B shapes", "lazy_hf_mixtral": "Mixtral-8x7B shapes"}  # lazy_hf*: with transformers
PEERS = {"llama.cpp": "llama.cpp", "transformers": "transformers (fp32)"}  # engine key in the results -> label


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def machine(m: dict) -> str:
    load = m.get("loadavg_before") or m.get("load_avg_start") or [None]
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, load {load[0]:.1f}" if load[0] is not None else m.get("cpu", "?")


def lazy_rows(name: str, label: str) -> list[str]:
    """moemesh (eager, and --compile where the run has it) vs each peer of the same run, per config."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    depth = d.get("model", {}).get("num_hidden_layers") or d.get("model", {}).get("layers")
    cmd = d.get("command", "").strip() or f"bench/lazy.py --model {name.removeprefix('lazy_')}"
    layers = f" ({depth} layer{'s' if depth != 1 else ''})" if depth else ""
    rows = []
    for key, s in d["summary"].items():
        if not s.get("moemesh") or not s["moemesh"].get("tokens_per_s"):
            continue
        cap = "no cap" if key == "none" else f"{key[1:]}% of expert bytes"
        plan = s.get("plan", {})
        floors = f"{ms(s['moemesh'].get('disk_floor_s_per_token'))} / {ms(plan.get('memory_floor_s'))} / " \
                 f"{ms(plan.get('compute_floor_s'))}"
        ours_all = [("", s["moemesh"])] + ([(", --compile", s["moemesh-compiled"])] if s.get("moemesh-compiled") else [])
        for peer_name in [p for p in PEERS if p in s] or [None]:
            peer = (s.get(peer_name) or {}).get("tokens_per_s") if peer_name else None
            why = "" if peer or not peer_name else " (" + (s[peer_name].get("failure") or "failed").split(" (")[0].split(";")[0] + ")"
            for suffix, e in ours_all:
                ours = e.get("tokens_per_s")
                if not ours:
                    continue
                ratio = f"{ours / peer:.2f}x" if peer else "-"
                rows.append(f"| {label}{layers}, {cap}{suffix} | {ours:.2f} | "
                            f"{'-' if peer is None else f'{peer:.2f}'} | {PEERS.get(peer_name, '-')}{why} | {ratio} | "
                            f"{floors} | {machine(d.get('machine', {}))} | `.venv/bin/python {cmd}` |")
    return rows


def decode_rows() -> list[str]:
    """bench/decode.py: per model, moemesh's default path vs llama.cpp (decode, with prefill in the row's
    label); results written before it covered every model hold SmolLM2's engines only ("engines")."""
    path = RESULTS / "decode.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    cmd = d["command"].removeprefix("cd /work/main && ")
    cmd = cmd if cmd.startswith(".venv/") else f".venv/bin/python {cmd}"
    rows = []
    if "engines" in d:  # the SmolLM2-only format
        peer = d["engines"].get("llama.cpp", {}).get("decode_tok_s_median")
        for name, e in d["engines"].items():
            if not name.startswith("moemesh"):
                continue
            ours = e["decode_tok_s_median"]
            rows.append(f"| SmolLM2-135M decode, {name.removeprefix('moemesh ')} | {ours:.1f} | {peer:.1f} | llama.cpp | "
                        f"{ours / peer:.2f}x | - | {machine(d.get('machine', {}))} | `{cmd}` |")
        return rows
    for r in d["rows"].values():
        ours, peer = r["moemesh"], r.get("llama.cpp", {})
        if not ours.get("decode_tok_s_median"):
            continue
        layers = f" ({r['layers']} layers)" if "shapes" in r["title"] else ""
        # a row rerun alone (decode.py --update) carries its own command and load average
        m = {**d.get("machine", {}), "loadavg_before": r["loadavg"]} if "loadavg" in r else d.get("machine", {})
        rcmd = f".venv/bin/python {r['command']}" if r.get("command") else cmd
        for what, key in (("decode", "decode_tok_s_median"), ("prefill", "prefill_tok_s_median")):
            p = peer.get(key)
            rows.append(f"| {r['title']}{layers}, {what}, default path | {ours[key]:.1f} | {'-' if p is None else f'{p:.1f}'} | "
                        f"llama.cpp | {'-' if not p else f'{ours[key] / p:.2f}x'} | - | {machine(m)} | `{rcmd}` |")
    return rows


def table() -> str:
    head = ["| benchmark, configuration | moemesh tok/s | peer tok/s (same run) | peer | ratio | floor ms/token: disk / memory / compute | machine | command |",
            "|---|---:|---:|---|---:|---|---|---|"]
    rows = [r for name, label in LAZY.items() for r in lazy_rows(name, label)] + decode_rows()
    return "\n".join([BEGIN, *head, *rows, END])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's table is out of date")
    a = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    new = text[: text.index(BEGIN)] + table() + text[text.index(END) + len(END):]
    if a.check:
        print("up to date" if new == text else "README.md's performance table is out of date")
        return 0 if new == text else 1
    readme.write_text(new)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
