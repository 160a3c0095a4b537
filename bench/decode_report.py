"""bench/decode.py's results as markdown: the side-by-side table, the physical floor and issue 22's goals."""
from __future__ import annotations


def markdown(p: dict) -> str:
    lines = ["# Decode and prefill: moemesh's default path vs llama.cpp", "",
             f"Fresh process per run, engines alternating, medians of {p['rounds']} round(s); prompt {p['prompt_tokens']} "
             f"tokens, then {p['warmup']} untimed and {p['decode_tokens']} timed greedy decode steps; {p['threads']} threads; "
             f"load average {p['loadavg_before'][0]:.1f} before, {p['loadavg_after'][0]:.1f} after. The machine (2 cores) "
             "is shared with other jobs (helpers running test suites): a load average above 2 means both engines ran "
             "on oversubscribed cores, which hurts 2-thread decode (spinning thread pools) far more than prefill.", "",
             "| model | layers | moemesh decode tok/s | llama.cpp decode tok/s | ratio | moemesh prefill tok/s | "
             "llama.cpp prefill tok/s | ratio | moemesh load s | moemesh first token s | measured (UTC), load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    for key, r in p["rows"].items():
        ours, peer = r["moemesh"], r.get("llama.cpp", {})
        lines.append(f"| {r['title']} | {r['layers']} | {f(ours.get('decode_tok_s_median'))} | "
                     f"{f(peer.get('decode_tok_s_median'))} | {f(r.get('decode_vs_llama_cpp'), '.2f')} | "
                     f"{f(ours.get('prefill_tok_s_median'), '.0f')} | {f(peer.get('prefill_tok_s_median'), '.0f')} | "
                     f"{f(r.get('prefill_vs_llama_cpp'), '.2f')} | {f(ours.get('load_s_median'))} | "
                     f"{f(ours.get('first_token_s_median'))} | {_when(r)} |")
        for e in ("moemesh", "llama.cpp"):
            if r.get(e, {}).get("error"):
                lines.append(f"|  | {e} failed: {r[e]['error'].strip().splitlines()[-1][:200]} ||||||||||")
    lines += ["", "Issue 22's goals per row (decode >= 1.2x llama.cpp, prefill >= 2x, first token of a fresh process "
              "<= 10 s; first token = process start -> first token: imports + load + prefill):", "",
              "| model | decode | prefill | first token | split: import / load / rest s |", "|---|---|---|---|---|"]
    for r in p["rows"].values():
        ours = r["moemesh"]
        d, pf, ft = r.get("decode_vs_llama_cpp"), r.get("prefill_vs_llama_cpp"), ours.get("first_token_s_median")
        goal = lambda v, g: "-" if v is None else f"{v:.3f}x {'met' if v >= g else 'NOT met'}"  # noqa: E731
        first = "-" if ft is None else f"{ft:.1f} s {'met' if ft <= 10 else 'NOT met'}"
        imp, ld = ours.get("import_s_median"), ours.get("load_s_median")
        split = "-" if None in (imp, ld, ft) else f"{imp:.1f} / {ld:.1f} / {ft - imp - ld:.1f}"
        loads = ours.get("trunk_cache") or []
        if loads:  # whether each run's load converted the trunk or mapped an earlier load's (weights/trunk_cache.py)
            first += f" ({sum(t == 'mapped' for t in loads)} of {len(loads)} loads mapped the trunk cache)"
        lines.append(f"| {r['title']} | {goal(d, 1.2)} | {goal(pf, 2.0)} | {first} | {split} |")
    floors = [(r, r["floor"]) for r in p["rows"].values() if r.get("floor")]
    if floors:
        lines += ["", "The physical floor of decode (bench/decode_floor.py): the bytes one moemesh decode token reads "
                  "(trunk, head, routers, one embedding row and the rescored head rows, top-k routed experts per MoE "
                  "layer: random weights route uniformly), over the median of sustained 2-thread reads of a 1 GiB "
                  "buffer, one fresh process per round beside the engines. No engine reading these bytes decodes "
                  "faster than the floor; llama.cpp reads about as many (the same experts; a Q4_0 trunk and head "
                  "without int4's zeros). The last column is the best decode ratio over llama.cpp this machine "
                  "allows at these bytes.", "",
                  "| model | MB per decode token | read GB/s (rounds) | floor tok/s | moemesh / floor | "
                  "llama.cpp / floor | floor / llama.cpp |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r, fl in floors:
            ours, peer = r["moemesh"].get("decode_tok_s_median"), r.get("llama.cpp", {}).get("decode_tok_s_median")
            rates = ", ".join(f"{v:.1f}" for v in fl["read_gb_s_all"])
            lines.append(f"| {r['title']} | {fl['bytes_per_token'] / 1e6:.1f} | {fl['read_gb_s_median']:.1f} ({rates}) | "
                         f"{fl['tok_s']:.1f} | {f(ours and ours / fl['tok_s'], '.2f')} | "
                         f"{f(peer and peer / fl['tok_s'], '.2f')} | {f(peer and fl['tok_s'] / peer, '.2f')} |")
    if p["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in p["notes"]]
    return "\n".join(lines) + "\n"


def _when(r: dict) -> str:
    if "measured_at" not in r:
        return "-"
    return f"{r['measured_at'][5:16].replace('T', ' ')}, {r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f}"
