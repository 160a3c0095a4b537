"""bench/lazy.py's report: the markdown table (bench/results/lazy*.md) and the tok/s-per-cap plot
(lazy*.png) from the result dict the run writes as JSON."""
from __future__ import annotations

from pathlib import Path

import lazy_hf
from moemesh.benchkit.synth import models as synth_models

MIB = 2**20


def _f(x, fmt="{:.2f}", scale=1.0):
    return "-" if x is None else fmt.format(x * scale)


ENGINES = ("moemesh", "moemesh-compiled", "moemesh-fit", "llama.cpp", lazy_hf.ENGINE)
ENGINE_LABEL = {"moemesh": "moemesh", "moemesh-compiled": "moemesh --compile", "moemesh-fit": "moemesh, cache fit to cap*",
                "llama.cpp": "llama.cpp",
                lazy_hf.ENGINE: lazy_hf.LABEL}


def markdown(r: dict) -> str:
    m, s = r["model"], r["settings"]
    disk_list = ", ".join("{:.1f}MiB/QD{} {:.2f}".format(d["request_bytes"] / MIB, d["queue_depth"], d["bytes_s"] / 1e9)
                          for d in r["disk"]["measurements"])
    name = synth_models.TITLES.get(m.get("name", "qwen3-30b-a3b"), m.get("name"))
    if name == "Qwen3-30B-A3B":
        shape = ("Qwen3-30B-A3B's shapes (128 experts, top-8, hidden 2048, expert width 768), "
                 f"vocab {m['vocab']} (the real 151936 would dominate a {m['layers']}-layer model and its caps)")
    else:
        shape = (f"{name}'s shapes ({m['moe_layers']} MoE; {m['experts_per_layer']} experts, top-{m['top_k']}, hidden "
                 f"{m['hidden']}; see benchkit/synth/models.py), vocab {m['vocab']}")
    gguf = (f"GGUF Q4_0 {m['gguf_bytes'] / 2**30:.2f} GiB, bit-identical expert weights" if m.get("gguf_bytes")
            else "no GGUF: llama.cpp not run")
    lines = [
        f"# Lazy experts{' vs llama.cpp' if m.get('gguf_bytes') else ''}{' and transformers' if r.get(lazy_hf.ENGINE) else ''}"
        f" ({name}-shaped, synthetic)", "",
        f"Model: {m['layers']} layer{'s' if m['layers'] != 1 else ''} of {shape}, int4 experts "
        f"({m['blob_bytes'] / MIB:.2f} MiB each, {m['expert_bytes'] / 2**30:.2f} GiB in all; {gguf}). "
        + ("**Synthetic weights route close to uniformly: the worst case for an expert cache.** " if name == "Qwen3-30B-A3B" else
           "**Synthetic random weights; how uniformly they route was not measured for this model** (bench/plan_check.py "
           "found Qwen3-shaped random routers far from uniform; `moemesh plan` below assumes uniform). ") +
        "Teacher-forced fixed pseudo-random token stream, one token per step; engines alternate; fresh process per run.", "",
        f"Machine: {r['machine']['cores']} cores, shared with other engineers' jobs (load average "
        f"{r['machine']['loadavg_before'][0]:.1f} before, {r['machine']['loadavg_after'][0]:.1f} after): **timings are noisy**. "
        f"Disk: best O_DIRECT random read {r['disk']['best_bytes_s'] / 1e9:.2f} GB/s "
        f"({disk_list} GB/s).", "",
        "| config | engine | tok/s (median; all) | hit rate | MiB read/token | read BW GB/s | stall ms/token | prefetch acc. | disk floor ms/token | time/floor | peak cgroup MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, row in r["summary"].items():
        cap = "no cap" if row["cap_bytes"] is None else f"{c[1:]}% cap ({row['cap_bytes'] / MIB:.0f} MiB)"
        for eng in [e for e in ENGINES if e in row]:
            e = row[eng]
            if not e.get("ok"):
                why = e.get("failure") or f"failed: {', '.join(e.get('errors', []))}"
                lines.append(f"| {cap} | {ENGINE_LABEL[eng]} | {why} | | | | | | | | |")
                continue
            bpt = e.get("bytes_read_per_token", e.get("disk_read_bytes_per_token"))
            allv = ", ".join(f"{x:.2f}" for x in e["tokens_per_s_all"])
            lines.append(
                f"| {cap} | {ENGINE_LABEL[eng]} | **{e['tokens_per_s']:.2f}** ({allv}) | {_f(e.get('hit_rate'))} | {_f(bpt, '{:.0f}', 1 / MIB)} | "
                f"{_f(e.get('read_bandwidth_bytes_s'), '{:.2f}', 1e-9)} | {_f(e.get('stall_s_per_token'), '{:.0f}', 1e3)} | "
                f"{_f(e.get('prefetch_accuracy'))} | {_f(e.get('disk_floor_s_per_token'), '{:.0f}', 1e3)} | {_f(e.get('over_floor'))} | "
                f"{_f(e.get('cgroup_max_usage_bytes'), '{:.0f}', 1 / MIB)} |")
    if any(row.get("plan") for row in r["summary"].values()):
        p0 = next(row["plan"] for row in r["summary"].values() if row.get("plan"))
        lines += ["", f"`moemesh plan` (int4 row; probe {p0['probe_date']}, uniform routing, shipped IO factor) next to the "
                  "measured moemesh runs:", "",
                  "| config | --ram MiB | measured tok/s | plan tok/s | plan / measured | plan slots / measured | plan hit rate / measured (incl. prefetch) | plan disk floor ms/token |",
                  "|---|---:|---:|---:|---:|---|---|---:|"]
        for c, row in r["summary"].items():
            p, e = row.get("plan") or {}, row.get("moemesh") or {}
            meas, pred = e.get("tokens_per_s"), p.get("tokens_per_s")
            ratio = _f(pred / meas) if pred and meas else "-"
            slots = (e.get("budget") or {}).get("slots", e.get("slots"))
            lines.append(f"| {c} | {_f(p.get('ram_bytes'), '{:.0f}', 1 / MIB)} | {_f(meas)} | {_f(pred)} | {ratio} | "
                         f"{p.get('cache_slots', '-')} / {slots if slots is not None else 'all'} | "
                         f"{_f(p.get('hit_rate'))} / {_f(e.get('hit_rate'))} | {_f(p.get('disk_floor_s'), '{:.0f}', 1e3)} |"
                         + (f" {p['why']}" if p.get("why") else ""))
    if s.get("fit_reserve_mib"):
        lines += ["", "*moemesh-fit: the same lazy experts with `ExpertOptions(slots=(cap - "
                  f"{s['fit_reserve_mib']} MiB) / blob)`, i.e. the cache the cap really leaves room for; plain moemesh sizes "
                  "it from `--ram` via `plan_budget`, which counts the mmap'ed bf16 embedding and head tables and a 384 MiB "
                  "runtime as resident (see slots below)."]
    lines += ["", "| config | engine | cache slots | misses/token | prefetch issued/used per token | expert fetch ms/token (stall+crc+build) | MoE ms/token | load s | load peak RSS MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c, row in r["summary"].items():
        for eng in [e for e in ("moemesh", "moemesh-fit") if e in row and row[e].get("ok")]:
            e = row[eng]
            slots = (e.get("budget") or {}).get("slots", e.get("slots"))
            lines.append(
                f"| {c} | {ENGINE_LABEL[eng]} | {slots if slots is not None else 'all resident'} | {_f(e.get('misses_per_token'), '{:.1f}')} | "
                f"{_f(e.get('prefetch_issued_per_token'), '{:.1f}')} / {_f(e.get('prefetch_hits_per_token'), '{:.1f}')} | "
                f"{_f(e.get('expert_fetch_s_per_token'), '{:.0f}', 1e3)} | {_f(e.get('moe_s_per_token'), '{:.0f}', 1e3)} | "
                f"{_f(e.get('load_s'), '{:.1f}')} | {_f(e.get('load_peak_rss_bytes'), '{:.0f}', 1 / MIB)} |")
    has_llama = any("llama.cpp" in row for row in r["summary"].values())
    th, ts = lazy_hf.ratio_header(bool(r.get(lazy_hf.ENGINE)))
    if has_llama:
        lines += ["", f"| config | moemesh / llama.cpp tok/s |{th} moemesh-fit / llama.cpp | goal (from the issue) | met |",
                  f"|---|---:|{ts}---:|---|---|"]
    for c, row in r["summary"].items() if has_llama else ():
        ratio, fit = _f(row.get("speedup_moemesh_over_llama")), _f(row.get("speedup_moemesh-fit_over_llama"))
        ratio += lazy_hf.ratio_cell(row, bool(th))
        if row["cap_bytes"] is None and "goal_at_least_llama" in row:
            comp = row.get("speedup_moemesh-compiled_over_llama")
            comp = f" (--compile: {comp:.2f})" if comp else ""
            lines.append(f"| {c} | {ratio}{comp} | | >= 1x llama.cpp | {row['goal_at_least_llama']} |")
        elif "goal_10x_llama" in row:
            of = row["moemesh"].get("over_floor")
            off = (row.get("moemesh-fit") or {}).get("over_floor")
            lines.append(f"| {c} | {ratio} | {fit} | >= 10x llama.cpp; time/token <= 1.5x disk floor (moemesh {_f(of)}x, "
                         f"moemesh-fit {_f(off)}x; uniform-routing floor for the budget's cache "
                         f"{_f(row.get('uniform_floor_s_per_token'), '{:.0f}', 1e3)} ms) | "
                         f"{row['goal_10x_llama']}, {row['goal_within_1.5x_floor']} (moemesh) |")
        else:
            lines.append(f"| {c} | {ratio} | {fit} | (none set; reported) | |")
    lines += ["", "Notes:",
              "- no cap: moemesh holds every expert (no --ram), llama.cpp runs with its defaults (mmap + CPU_REPACK, which copies "
              "all Q4_0 weights into anonymous memory). Page cache warm.",
              "- qNN: cgroup-v1 memory limit of NN% of the expert bytes, page cache counted and dropped before each run. moemesh: "
              f"lazy experts, --ram = cap - {s['margin_mib']} MiB, policy {s['policy']}, {s['io_threads']} I/O threads, "
              "O_DIRECT, blob checksums verified (xxh3-64). llama.cpp: use_extra_bufts off (no repacking) so its weights stay mmap'ed and page in on demand. "
              f"Both engines load under cap + {s['load_headroom_mib']} MiB and lower their own cgroup limit to the cap before "
              "the first decode step (moemesh's load-time peak exceeds the cap: see below); the cgroup's max usage is reset "
              "then, so 'peak cgroup MiB' covers decoding.",
              f"- {s['warmup']} untimed warm-up steps, then {s['tokens']} timed steps ({s['llama_capped_tokens']} for llama.cpp "
              f"under a cap); medians over {s['repeats']} repeats.",
              "- hit rate counts prefetched experts as hits; disk floor = bytes read per token / best measured O_DIRECT "
              "bandwidth; llama.cpp's bytes are the process's /proc/self/io read_bytes (page-cache misses); moemesh's are its "
              "reader's bytes (demand misses + prefetches, wasted ones included).",
              f"- both engines: {s['threads']} compute threads, OMP_WAIT_POLICY={s['omp_wait_policy'] or '(default)'} "
              "(with spinning OpenMP threads both engines' 2-thread decode collapsed 5-20x on this oversubscribed machine).",
              "- trunk: moemesh quantizes the bf16 trunk to int4 (group 32, asymmetric) at load; llama.cpp reads Q4_0 of the "
              "same bf16 values; experts are bit-identical."]
    if r.get(lazy_hf.ENGINE):
        lines += lazy_hf.notes(r)
    if not has_llama:  # the notes above describe both engines; only moemesh ran
        lines.append("- only moemesh ran (no GGUF of this architecture is written: see benchkit/synth/models.py); the "
                     "llama.cpp parts of these notes do not apply.")
    if any(row.get("plan") for row in r["summary"].values()):
        lines.append("- plan: `moemesh plan STORE --ram RAM --probe PROBE`'s int4 prediction (commands/plan.plan) with the "
                     "config's --ram (no cap: everything resident), from the probe named in the JSON; it assumes uniform "
                     "routing and does not count prefetch hits.")
    if r.get("parity"):
        p = r["parity"]
        lines.append(f"- parity, first {len(p['cosine'])} steps (no cap): logits cosine "
                     f"{', '.join(f'{x:.4f}' for x in p['cosine'])}, top-1 agreement {p['top1_agree']}.")
    for k, x in r.get("extra", {}).items():
        if k.startswith("moemesh_load_under_cap_"):
            cg = x.get("cgroup") or {}
            lines.append(f"- moemesh loading under the {x['config']} cap from the start (no headroom): {x['result']}"
                         f" (cgroup max usage {_f(cg.get('max_usage_bytes'), '{:.0f}', 1 / MIB)} MiB of "
                         f"{_f(cg.get('limit_bytes'), '{:.0f}', 1 / MIB)} MiB).")
    x = r.get("extra", {}).get("llama_repack_under_cap")
    if x:
        lines.append(f"- llama.cpp with its default repacking under the {x['config']} cap: {x['result']}.")
    lines += ["", "Command:", "", "```", f".venv/bin/python {r['command']}", "```", "",
              f"Total wall time {r['wall_s'] / 60:.1f} min (model generation {r['generation_s']:.0f} s, cached under --work-dir)."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = list(r["summary"])
    fig, ax = plt.subplots(figsize=(7, 4))
    engines = [e for e in ENGINES if any(e in row for row in r["summary"].values())]
    w = 0.27 if len(engines) <= 3 else 0.8 / len(engines)
    for j, eng in enumerate(engines):
        vals = [(r["summary"][c].get(eng) or {}).get("tokens_per_s") or 0 for c in cfgs]
        off = j - 1 if len(engines) <= 3 else j - (len(engines) - 1) / 2
        bars = ax.bar([i + off * w for i in range(len(cfgs))], vals, w, label=ENGINE_LABEL[eng].rstrip("*"))
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for i, c in enumerate(cfgs):
        fl = r["summary"][c]["moemesh"].get("disk_floor_s_per_token")
        if fl and r["summary"][c]["cap_bytes"] is not None:
            ax.plot([i - 1.5 * w, i + 1.5 * w], [1 / fl] * 2, "k--", lw=1,
                    label="moemesh disk-floor speed" if i == cfgs.index(next(k for k in cfgs if k != "none")) else None)
    ax.set_xticks(range(len(cfgs)), ["no cap" if c == "none" else f"{c[1:]}% of experts" for c in cfgs])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"{r['model']['layers']}-layer {synth_models.TITLES.get(r['model'].get('name'), 'Qwen3-30B-A3B')}-shaped, synthetic (uniform routing)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
