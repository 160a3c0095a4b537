"""bench/fullscale.py's results as markdown (the issue's goals met or not, with the figures) and a plot
of decode tok/s vs cap."""
from __future__ import annotations

from pathlib import Path

from moemesh.benchkit.synth.whole import GPT_OSS_WINDOW

GIB = 2**30
MIB = 2**20
GOALS = {"gpt-oss-120b": 10.0, "qwen3-30b-a3b": 5.0}  # moemesh / llama.cpp under the 8 GB cap


def f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def read_per_token(s: dict) -> float | None:
    """Bytes an arm read per token: moemesh's expert reads, or (llama.cpp) the process's disk reads."""
    return s.get("bytes_read_per_token", s.get("disk_read_bytes_per_token"))


def floor(m: dict, s: dict) -> tuple[float | None, float | None]:
    """(disk floor s per token, time per token / floor) of an arm's summary: the bytes it read per token
    over the probe's median bandwidth (cold random reads of one expert slice at the engine's queue
    depth), or (None, None)."""
    bpt = read_per_token(s)
    bps = (m.get("disk") or {}).get("bytes_s")
    if not bpt or not bps or not s.get("tokens_per_s"):
        return None, None
    return bpt / bps, (1 / s["tokens_per_s"]) / (bpt / bps)


def decode_table(name: str, m: dict) -> list[str]:
    lines = ["| cap | engine, routing | tok/s (median; all) | ok/runs | hit rate: cached / + prefetched | MiB read/token | "
             "read GB/s achieved | disk floor ms/token | time / floor | peak RSS MiB | peak cgroup MiB | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c, row in m["caps"].items():
        if row.get("skipped"):
            lines.append(f"| {c} | - | {row['skipped']} | | | | | | | | | |")
        for arm, a in row["arms"].items():
            s = a["summary"]
            if not s.get("runs"):  # an arm that ran nothing (a TTFT-only run's --llama-repeats 0)
                continue
            bpt = read_per_token(s)
            fl, over = floor(m, s)
            alls = ", ".join(f"{x:.3f}" for x in s.get("tokens_per_s_all", []))
            lines.append(f"| {c} | {arm} | **{f(s.get('tokens_per_s'), '{:.3f}')}** ({alls}) | {s['ok']}/{s['runs']} | "
                         f"{f(s.get('resident_hit_rate'))} / {f(s.get('hit_rate'))} | "
                         f"{f(bpt / MIB if bpt is not None else None, '{:.0f}')} | "
                         f"{f(s['read_throughput_bytes_s'] / 1e9 if s.get('read_throughput_bytes_s') else None)} | "
                         f"{f(fl * 1e3 if fl else None, '{:.0f}')} | "
                         f"{f(over)} | {f(s['peak_rss_bytes'] / MIB if s.get('peak_rss_bytes') else None, '{:.0f}')} | "
                         f"{f(s['cgroup_max_usage_bytes'] / MIB if s.get('cgroup_max_usage_bytes') else None, '{:.0f}')} | "
                         f"{'; '.join(s['errors'])[:90]} |")
    return lines


def goals(name: str, m: dict) -> list[str]:
    out = []
    for c, row in m["caps"].items():
        arms = {k: a["summary"] for k, a in row["arms"].items()}
        mr, mu = arms.get("moemesh router", {}), arms.get("moemesh uniform", {})
        lu = arms.get("llama.cpp router", {})
        cap = row["cap_bytes"]
        need = GOALS.get(name, 1.0) if cap is not None else 1.0
        if mr.get("tokens_per_s") and lu.get("tokens_per_s"):
            ratio = mr["tokens_per_s"] / lu["tokens_per_s"]
            out.append(f"- {c}: moemesh / llama.cpp, same router, same file = **{ratio:.2f}x** (goal >= {need:g}x): "
                       f"{'met' if ratio >= need else 'NOT met'}")
        elif mr.get("tokens_per_s"):
            out.append(f"- {c}: llama.cpp gave no figure ({'; '.join(lu.get('errors', [])) or 'not run'}): "
                       f"moemesh {mr['tokens_per_s']:.3f} tok/s vs llama.cpp < {lower_bound(row):s}")
        over = floor(m, mu)[1]
        if cap is not None and over:
            got = mu.get("read_throughput_bytes_s") or 0
            verdict = "met" if 1 <= over <= 1.25 else "NOT met" if over > 1.25 else (
                f"not judged: below 1, the arm sustained {got / 1e9:.2f} GB/s where the cold probe read "
                f"{m['disk']['bytes_s'] / 1e9:.2f}, so the probe is not this arm's floor (its repeated expert reads can "
                "come from the host's cache of this VM's disk, which the guest cannot drop)")
            out.append(f"- {c}: moemesh time per token / disk floor (uniform trace) = **{over:.2f}x** (goal <= 1.25x): {verdict}")
        peaks = [a["peak_rss_bytes"] for k, a in arms.items() if k.startswith("moemesh") and a.get("peak_rss_bytes")]
        if cap is not None and peaks:
            out.append(f"- {c}: moemesh peak RSS (max of the arms' medians) {max(peaks) / GIB:.2f} GiB vs cap "
                       f"{cap / GIB:.0f} GiB: {'met' if max(peaks) <= cap else 'NOT met'}")
        p = row.get("plan")
        if p and p.get("tokens_per_s") and mu.get("tokens_per_s"):
            err = p["tokens_per_s"] / mu["tokens_per_s"] - 1
            out.append(f"- {c}: plan {p['tokens_per_s']:.3f} tok/s vs measured {mu['tokens_per_s']:.3f} ({err:+.0%}; "
                       f"goal within 25%): {'met' if abs(err) <= 0.25 else 'NOT met'}")
    return out


def lower_bound(row: dict) -> str:
    runs = row["arms"].get("llama.cpp router", {}).get("runs", [])
    t = [r for r in runs if str(r.get("error", "")).startswith("timeout")]
    return "1 token per timeout" if t else "?"


def prompt_read(run: dict) -> float | None:
    """Bytes a TTFT run read: moemesh's expert reads, or (llama.cpp) the process's disk reads."""
    return run.get("bytes_read", run.get("disk_read_bytes"))


def prefill_macs(spec: dict, n: int) -> dict[str, float]:
    """Multiply-adds of an n-token prompt besides the experts: attention (scores and values of the keys each
    query sees; gpt-oss: every other layer a 128-token sliding window) and the attention projections."""
    hd, heads, kv, d, layers = spec["head_dim"], spec["heads"], spec["kv_heads"], spec["hidden"], spec["layers"]
    windowed = layers // 2 if spec["arch"] == "gpt-oss" else 0
    full_keys = n * (n + 1) / 2
    window_keys = sum(min(i + 1, GPT_OSS_WINDOW) for i in range(n))
    attention = heads * 2 * hd * ((layers - windowed) * full_keys + windowed * window_keys)
    trunk = n * layers * (d * (heads + 2 * kv) * hd + heads * hd * d)
    return {"attention": attention, "trunk": trunk}


def prefill_floors(m: dict) -> dict[str, dict]:
    """prompt length -> its floor: the experts the prompt touches read once at the probe's bandwidth, + the
    experts' matmuls at the kernel's rate, + (where the run measured their rates) the attention at the
    prefill attention kernel's rate and the attention projections at the block kernel's. The touched bytes:
    the expectation under uniform routing, or what moemesh's layer-major prefill read where that is less (it
    reads each routed expert of a layer once, so its bytes bound the set the model's own router touched from
    above)."""
    p, bps = m["prefill"], (m.get("disk") or {}).get("bytes_s")
    ar, tr = (p.get("attention_rate") or {}).get("gmacs_s"), (p.get("trunk_rate") or {}).get("gflops")
    out = {}
    for n, fl in p["floors"].items():
        run = p["runs"].get(f"moemesh {n}", {})
        read = prompt_read(run)
        io = min(fl["io_s"], read / bps) if read and bps else fl["io_s"]
        macs = prefill_macs(m["spec"], int(n))
        att = macs["attention"] / (ar * 1e9) if ar else None
        trunk = 2 * macs["trunk"] / (tr * 1e9) if tr else None
        out[str(n)] = {"io_s": io, "compute_s": fl["compute_s"], "attention_s": att, "trunk_s": trunk,
                       "floor_s": io + (fl["compute_s"] or 0.0) + (att or 0.0) + (trunk or 0.0)}
    return out


def prefill_lines(m: dict) -> list[str]:
    p = m.get("prefill")
    if not p:
        return []
    floors = prefill_floors(m)
    ar, tr = p.get("attention_rate") or {}, p.get("trunk_rate") or {}
    rest = (f"the attention at the prefill attention kernel's measured rate ({f(ar.get('gmacs_s'), '{:.1f}')} G "
            f"multiply-adds/s, a {ar.get('rows')}-query chunk at position {ar.get('start')}) and the attention "
            f"projections at the block kernel's ({f(tr.get('gflops'), '{:.1f}')} GFLOP/s, {tr.get('qtype')}, "
            f"{tr.get('rows')} rows)" if ar or tr else "attention and the attention projections not counted (this run "
            "did not measure their rates)")
    lines = ["", f"Time to first token under the {p['cap']} cap (the model's own router; moemesh layer-major prefill, llama.cpp "
             "512-token batches). Floor = bytes of the experts the prompt touches (expected distinct experts per layer "
             "under uniform routing, or the bytes moemesh read where less: it reads each routed expert once) / disk "
             "floor bandwidth + the experts' matmuls at the block kernel's measured rate "
             f"({f((p.get('compute_rate') or {}).get('gflops'), '{:.1f}')} GFLOP/s at "
             f"{(p.get('compute_rate') or {}).get('rows')} rows) + {rest}. Norms, routers, the head and the "
             "reads that do not overlap compute are not in it.", "",
             "| prompt | engine | TTFT s | prefill tok/s | floor s (I/O + experts + attention + projections) | TTFT / floor "
             "| MiB read | peak RSS MiB | error |",
             "|---:|---|---:|---:|---|---:|---:|---:|---|"]
    for key, r in p["runs"].items():
        engine, n = key.rsplit(" ", 1)
        fl = floors.get(str(n))
        ratio = r["ttft_s"] / fl["floor_s"] if r.get("ttft_s") and fl else None
        rd = prompt_read(r)
        parts = " + ".join(f(fl[k], "{:.1f}") for k in ("io_s", "compute_s", "attention_s", "trunk_s"))
        lines.append(f"| {n} | {engine} | {f(r.get('ttft_s'), '{:.1f}')} | {f(r.get('prefill_tokens_per_s'), '{:.1f}')} | "
                     f"{fl['floor_s']:.1f} ({parts}) | {f(ratio)} | "
                     f"{f(rd / MIB if rd else None, '{:.0f}')} | {f(r['peak_rss_bytes'] / MIB if r.get('peak_rss_bytes') else None, '{:.0f}')} | "
                     f"{r.get('error', '')} |")
    return lines


def prefill_goals(m: dict) -> list[str]:
    """Issue 19: each engine's time to first token within 1.5x of the prompt's floor."""
    p = m.get("prefill")
    if not p:
        return []
    floors, out = prefill_floors(m), []
    for key, r in p["runs"].items():
        engine, n = key.rsplit(" ", 1)
        if r.get("ttft_s") and str(n) in floors:
            ratio = r["ttft_s"] / floors[str(n)]["floor_s"]
            out.append(f"- {p['cap']}: {engine} first token of {n} tokens / floor = **{ratio:.2f}x** (goal <= 1.5x): "
                       f"{'met' if ratio <= 1.5 else 'NOT met'}")
    return out


def markdown(r: dict) -> str:
    lines = [f"# Whole models under memory caps ({r['date']}){' - QUICK (tiny shapes, not published figures)' if r['quick'] else ''}",
             "", f"`{r['command']}`", "",
             f"Machine: {r['machine'].get('cpu_model')}, {r['machine'].get('cores')} cores, disk {r['machine'].get('disk_device')}, "
             f"kernel {r['machine'].get('kernel')}; load average {r['loadavg_before'][0]:.1f} before, "
             f"{(r.get('loadavg_after') or [0])[0]:.1f} after (shared machine: timings are noisy). Probe for plan: {r.get('probe')}.",
             "", "Random valid weights at the real shapes (benchkit/synth/whole.py). Routing arms, always labelled: "
             "'router' = the random model's own router (what llama.cpp runs too: the engines compared on the same "
             "routing; random routers are NOT uniform, see the hit rates), 'uniform' = a uniform trace replayed as the "
             "router's picks (benchkit/trace_router.py; the worst case, the disk-floor goal's setting), 'calibrated' = a "
             "trace fitted to published measurements of the real model (benchkit/routing_trace.py). Caps: cgroup-v1 "
             "memory.limit_in_bytes (page cache counted) from the process's first byte, page cache dropped before every "
             "run; G = GiB. llama.cpp: llama-cpp-python, mmap, no repacking, its own router."]
    lines += [f"- note: {n}" for n in r.get("notes", [])]
    for mr in r.get("merged_runs", []):
        lines.append(f"- merged in: `{mr['command']}` ({mr['date']}; load {mr['loadavg_before'][0]:.1f} before, "
                     f"{(mr.get('loadavg_after') or [0])[0]:.1f} after); its arms' disk floors use its own disk measurement")
    for name, m in r["models"].items():
        s = m["spec"]
        ex = m.get("exactness", {})
        d = m.get("disk", {})
        lines += ["", f"## {name}: {s['layers']} layers x {s['experts']} {s['expert_type']} experts, top-{s['top_k']}; "
                  f"GGUF {m['file_bytes'] / 1e9:.1f} GB ({m['expert_bytes'] / 1e9:.1f} GB of experts)", "",
                  f"- exactness, first 2 layers of the whole file: lazy == resident bit for bit: "
                  f"**{ex.get('lazy_equals_resident')}**; layer-major == chunked prefill bit for bit: "
                  f"**{ex.get('layer_major_equals_chunked')}** (layer-major ran: {ex.get('layer_major_ran')}; "
                  f"{ex.get('tokens')} tokens, chunks of {ex.get('chunk')}; finite: {ex.get('finite')}) {ex.get('error', '')}",
                  f"- disk floor: {f(d.get('bytes_s', 0) / 1e9)} GB/s median O_DIRECT random reads of "
                  f"{f(d.get('request_bytes', 0) / MIB)} MiB (one expert slice) at QD{d.get('queue_depth')} "
                  f"(all: {', '.join(f'{x / 1e9:.2f}' for x in d.get('all', []))}); 'read GB/s achieved' = the bytes an arm "
                  "read over its timed wall time (reads overlap compute, so the device gave at least that)",
                  "- hit rate: 'cached' = demanded experts already in the cache; '+ prefetched' also counts those a "
                  "prefetch had brought in by then (the plan's hit rate is the cached one)", ""]
        lines += decode_table(name, m)
        pl = [(c, row["plan"]) for c, row in m["caps"].items() if row.get("plan")]
        if pl:
            lines += ["", "| cap | plan tok/s (uniform routing) | plan hit rate | plan slots | measured moemesh uniform-trace tok/s | plan / measured |",
                      "|---|---:|---:|---:|---:|---:|"]
            for c, p in pl:
                meas = m["caps"][c]["arms"].get("moemesh uniform", {}).get("summary", {}).get("tokens_per_s")
                lines.append(f"| {c} | {f(p.get('tokens_per_s'), '{:.3f}')} | {f(p.get('hit_rate'))} | {p.get('cache_slots')} | "
                             f"{f(meas, '{:.3f}')} | {f(p['tokens_per_s'] / meas if meas and p.get('tokens_per_s') else None)} |")
        lines += prefill_lines(m)
        lines += ["", "Goals (issue 19):"] + goals(name, m) + prefill_goals(m)
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in r["models"].items():
        arms: dict[str, list] = {}
        for row in m["caps"].values():
            x = (row["cap_bytes"] or m["file_bytes"] * 1.15) / GIB  # uncapped: drawn past the file's size
            for arm, a in row["arms"].items():
                if a["summary"].get("tokens_per_s"):
                    arms.setdefault(arm, []).append((x, a["summary"]["tokens_per_s"]))
        for arm, pts in arms.items():
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=f"{name}: {arm}")
    ax.set_xlabel("memory cap (GiB; rightmost points of a model = no cap)")
    ax.set_ylabel("decode tok/s (median)")
    ax.set_yscale("log")
    ax.set_title("whole models, one file, both engines" + (" (QUICK: tiny shapes)" if r["quick"] else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
