"""The user's own file at its own bits: moemesh reading a GGUF in place vs its expert store vs llama.cpp.

Two synthetic GGUFs with real per-layer shapes, a few layers deep, vocabulary ``--vocab``:

* ``gpt-oss-120b``: hidden 2880, 128 experts of width 2880, top-4, 64/8 heads of 64, MXFP4 experts
  (random e2m1 codes, e8m0 scale 2^-7) with fp32 biases, MXFP4 token table and head, Q8_0 attention;
* ``qwen3-30b-a3b``: hidden 2048, 128 experts of width 768, top-8, 32/4 heads of 128, Q4_K experts,
  token table, head and attention (random valid blocks, benchkit/synth_blocks.py).

Engines, each run a fresh process decoding a fixed pseudo-random token stream one token a step
(teacher forced; bench/lazy_worker.py, bench/lazy_llama.py):

* ``moemesh-gguf``: ``load_model(FILE.gguf)``: experts at their stored precision (BlockLinear), read
  straight from the GGUF's stacked expert tensors under a cap (``--ram``);
* ``moemesh-store``: the same experts in an expert store (``convert --quant auto``: the same bytes in
  one aligned, checksummed blob per expert);
* ``llama.cpp``: llama-cpp-python on the same GGUF (``--llama-python``; skipped, and said so, when it
  is not installed).

Configurations: ``none`` (no cap) and ``qNN`` (a cgroup-v1 memory cap of NN% of the expert bytes,
page cache counted and dropped first; needs root; skipped otherwise). Random weights route about
uniformly: the worst case for an expert cache. Writes bench/results/native_formats.{json,md}.

    .venv/bin/python bench/native_formats.py [--models gpt-oss-120b,qwen3-30b-a3b] [--configs none,q25] [--repeats 3]
    .venv/bin/python bench/native_formats.py --quick     # 1 layer, 8 experts, small vocab, 1 repeat: ~1-2 min
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cgroup  # noqa: E402
from lazy_runs import run_worker, summarize, token_stream  # noqa: E402

RESULTS = HERE / "results"
MIB = 2**20
ENGINES = ("moemesh-gguf", "moemesh-store", "llama.cpp")

# per-layer shapes (the published config.json values) and the formats the bench writes them in
MODELS = {
    "gpt-oss-120b": dict(arch="gpt-oss", hidden=2880, inter=2880, experts=128, top_k=4, heads=64, kv_heads=8,
                         head_dim=64, layers=2, expert_type="MXFP4", table_type="MXFP4", attn_type="Q8_0"),
    "qwen3-30b-a3b": dict(arch="qwen3moe", hidden=2048, inter=768, experts=128, top_k=8, heads=32, kv_heads=4,
                          head_dim=128, layers=4, expert_type="Q4_K", table_type="Q4_K", attn_type="Q4_K"),
}


def blocks(qtype: str, rows: int, cols: int, rng, lead: int = 1):
    """[lead, rows, row_bytes] (or [rows, row_bytes]) random valid blocks of ``qtype``."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from moemesh.benchkit.synth_blocks import random_blocks

    out = np.stack([random_blocks(Q[qtype], rows, cols, rng) for _ in range(lead)])
    return out if lead > 1 else out[0]


def write_gguf(path: Path, m: dict, layers: int, experts: int, vocab: int, seed: int) -> None:
    """Declare every tensor, write the header, then stream each tensor's bytes (an expert stack is
    written as it is generated: a gpt-oss layer's gate stack alone is 564 MB)."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    d, inter, h, kv, hd = m["hidden"], m["inter"], m["heads"], m["kv_heads"], m["head_dim"]
    gpt_oss = m["arch"] == "gpt-oss"
    w = gguf.GGUFWriter(str(path), m["arch"])
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(inter)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-5 if gpt_oss else 1e-6)
    w.add_rope_freq_base(150000.0 if gpt_oss else 1e6)
    w.add_expert_count(experts)
    w.add_expert_used_count(m["top_k"])
    w.add_expert_feed_forward_length(inter)
    if gpt_oss:
        w.add_sliding_window(128)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(32.0)
        w.add_rope_scaling_orig_ctx_len(4096)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<|bos|>", "<|eos|>", "t", "1", "t1"] + [f"x{i}" for i in range(6, vocab)])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (vocab - 3))
    w.add_token_merges(["t 1"])
    w.add_eos_token_id(2)
    makers = []  # (name, shape of the elements, ggml type, () -> data), in file order

    def add(name: str, shape: tuple[int, ...], qtype: str, make) -> None:
        q = Q[qtype]
        block, size = gguf.GGML_QUANT_SIZES[q]
        nbytes = int(np.prod(shape[:-1])) * shape[-1] // block * size
        byte_shape = list(shape[:-1]) + [shape[-1] // block * size] if qtype not in ("F32",) else list(shape)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8 if qtype != "F32" else np.float32), nbytes,
                          raw_dtype=None if qtype == "F32" else q)
        makers.append(make)

    f32 = lambda *shape, scale=1.0: (lambda: (rng.standard_normal(shape) * scale).astype(np.float32))  # noqa: E731
    add("token_embd.weight", (vocab, d), m["table_type"], lambda: blocks(m["table_type"], vocab, d, rng))
    add("output_norm.weight", (d,), "F32", f32(d, scale=0.1))
    add("output.weight", (vocab, d), m["table_type"], lambda: blocks(m["table_type"], vocab, d, rng))
    at = m["attn_type"]
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (d,), "F32", f32(d, scale=0.1))
        add(p + ("post_attention_norm.weight" if gpt_oss else "ffn_norm.weight"), (d,), "F32", f32(d, scale=0.1))
        for name, rows, cols in (("attn_q", h * hd, d), ("attn_k", kv * hd, d), ("attn_v", kv * hd, d), ("attn_output", d, h * hd)):
            add(p + name + ".weight", (rows, cols), at, lambda r=rows, c=cols: blocks(at, r, c, rng))
            if gpt_oss:
                add(p + name + ".bias", (rows,), "F32", f32(rows, scale=0.01))
        if gpt_oss:
            add(p + "attn_sinks.weight", (h,), "F32", f32(h))
            add(p + "ffn_gate_inp.bias", (experts,), "F32", f32(experts, scale=0.1))
        else:
            add(p + "attn_q_norm.weight", (hd,), "F32", f32(hd, scale=0.1))
            add(p + "attn_k_norm.weight", (hd,), "F32", f32(hd, scale=0.1))
        add(p + "ffn_gate_inp.weight", (experts, d), "F32", f32(experts, d, scale=0.05))
        et = m["expert_type"]
        for part, rows, cols in (("gate", inter, d), ("up", inter, d), ("down", d, inter)):
            add(p + f"ffn_{part}_exps.weight", (experts, rows, cols), et,
                lambda r=rows, c=cols: blocks(et, r, c, rng, experts))
            if gpt_oss:
                add(p + f"ffn_{part}_exps.bias", (experts, rows), "F32", f32(experts, rows, scale=0.01))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for make in makers:
        w.write_tensor_data(make())
    w.close()


def prepare(work: Path, name: str, layers: int, experts: int, vocab: int, seed: int, log) -> SimpleNamespace:
    """The GGUF and its expert store, made once per shape under ``work``."""
    from moemesh.loading.convert import convert
    from moemesh.store.expert_store import ExpertStore

    root = work / f"{name}-L{layers}-E{experts}-V{vocab}-s{seed}"
    gguf_path, store = root / "model.gguf", root / "store"
    if not (root / "DONE").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t = time.time()
        write_gguf(gguf_path, MODELS[name], layers, experts, vocab, seed)
        log(f"{name}: wrote {gguf_path} ({gguf_path.stat().st_size / 2**30:.2f} GiB) in {time.time() - t:.0f} s")
        t = time.time()
        convert(gguf_path, store, "auto", progress=False)
        log(f"{name}: expert store (the same bytes, one blob per expert) in {time.time() - t:.0f} s")
        (root / "DONE").write_text("ok")
    st = ExpertStore(store)
    return SimpleNamespace(root=root, gguf=gguf_path, store=store, st=st, expert_bytes=st.expert_bytes())


def read_rates(b: SimpleNamespace, top_k: int, rounds: int, seconds: float) -> dict:
    """What the store's contiguous blobs buy over reading the GGUF in place, I/O alone: one MoE layer's
    worth of random experts (``top_k`` at once, as a token's misses are issued) read into cache slots
    with O_DIRECT, ``finish`` included (the store: one read + its xxh3 check; the file: three reads +
    moving the up rows next to the gate rows), the two sources alternating ``rounds`` times."""
    import mmap
    import random

    from moemesh.experts.io import BlobReader
    from moemesh.loading.file_experts import file_expert_source, gguf_locator
    from moemesh.loading.source import arch_and_args, open_source

    config, source, _ = open_source(b.gguf)
    spec, margs = arch_and_args(b.gguf, config)
    direct, why = file_expert_source(spec, margs, *gguf_locator(source.ckpt))
    if direct is None:
        return {"error": why}
    rng = random.Random(0)
    keys = [(layer, e) for layer in direct.moe_layers for e in range(direct.num_experts)]
    out: dict[str, list[float]] = {"gguf": [], "store": [], "store_unverified": []}
    for _ in range(rounds):
        for name, src, verify in (("gguf", direct, False), ("store", b.st, True), ("store_unverified", b.st, False)):
            reader = BlobReader(src.files, 4, True)
            mem = mmap.mmap(-1, top_k * src.slot_bytes)
            view = memoryview(mem)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                futs = []
                for i, (layer, e) in enumerate(rng.sample(keys, min(top_k, len(keys)))):
                    slot = view[i * src.slot_bytes:(i + 1) * src.slot_bytes]
                    futs.append(reader.submit_spans(src.spans(layer, e), slot,
                                                    lambda v, lay=layer, ex=e, s=src, ver=verify: s.finish(lay, ex, v, ver)))
                for f in futs:
                    n += f.result()
            out[name].append(n / (time.perf_counter() - t0))
            reader.close()  # (the slots' mapping goes with its last view)
    import statistics

    return {k: {"bytes_s_median": statistics.median(v), "bytes_s_all": v} for k, v in out.items()} | {
        "gguf_over_store": statistics.median(out["gguf"]) / statistics.median(out["store"]),
        "gguf_over_store_unverified": statistics.median(out["gguf"]) / statistics.median(out["store_unverified"]),
        "slot_bytes": {"gguf": direct.slot_bytes, "store": b.st.slot_bytes}}


def worker_cfg(engine: str, b: SimpleNamespace, args, cap: int | None) -> dict:
    if engine == "llama.cpp":
        return {"model": str(b.gguf), "tokens": b.stream, "warmup": args.warmup, "threads": args.threads,
                "repack": cap is None, "logits": 0}
    return {"store": str(b.gguf if engine == "moemesh-gguf" else b.store), "quant": "auto", "tokens": b.stream,
            "warmup": args.warmup, "threads": args.threads, "io_threads": args.io_threads, "policy": "lfu",
            "prefetch": True, "ram": None if cap is None else cap - args.margin_mib * MIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt-oss-120b,qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, help="depth (default: gpt-oss 2, qwen3 4)")
    ap.add_argument("--experts", type=int, help="experts per layer (default: the model's 128)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--configs", default="none,q25", help="none and/or qNN (cap = NN%% of the expert bytes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--margin-mib", type=int, default=128, help="moemesh --ram = cap - margin")
    ap.add_argument("--cap-base-mib", type=int, default=0,
                    help="cap = this + NN%% of the expert bytes (default 0: the published definition, bench/lazy.py's; "
                         "--quick's tiny experts need the runtime's ~600 MiB on top)")
    ap.add_argument("--load-headroom-mib", type=int, default=3072, help="capped runs load under cap + this, then cap")
    ap.add_argument("--omp-wait-policy", default="PASSIVE")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--work-dir", default="/work/bench-data/native")
    from moemesh.benchkit.suites import DEFAULT_LLAMA_PYTHON

    ap.add_argument("--llama-python", default=os.environ.get("MOEMESH_LLAMA_PYTHON") or DEFAULT_LLAMA_PYTHON,
                    help="llama-cpp-python's interpreter (`make peers` builds it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-rounds", type=int, default=5, help="alternating rounds of the I/O-only comparison")
    ap.add_argument("--quick", action="store_true", help="1 layer, 8 experts, vocab 4096, 1 repeat, 4 tokens")
    ap.add_argument("--out", default=str(RESULTS / "native_formats"))
    args = ap.parse_args()
    if args.quick:
        args.layers, args.experts, args.vocab, args.repeats, args.tokens, args.warmup = 1, 8, 4096, 1, 4, 1
        args.cap_base_mib = args.cap_base_mib or 640
        args.read_rounds = 3
        args.out = args.out + "_quick" if args.out == str(RESULTS / "native_formats") else args.out
    llama = Path(args.llama_python).is_file()
    notes = [] if llama else [f"llama.cpp skipped: no {args.llama_python} (install llama-cpp-python there to compare)"]
    capped_ok = cgroup.available()
    if not capped_ok:
        notes.append("capped configs skipped: they need root and the cgroup-v1 memory controller")
    for n in notes:
        print("note: " + n, flush=True)
    engines = [e for e in ENGINES if e != "llama.cpp" or llama]
    t_start, load_before = time.time(), os.getloadavg()
    summary, runs, models = {}, {}, {}
    for name in [x.strip() for x in args.models.split(",") if x.strip()]:
        m = MODELS[name]
        b = prepare(Path(args.work_dir), name, args.layers or m["layers"], args.experts or m["experts"], args.vocab,
                    args.seed, lambda s: print(s, flush=True))
        b.stream = token_stream(args.warmup + args.tokens, args.vocab, args.seed)
        models[name] = {"layers": len(b.st.moe_layers), "experts": b.st.num_experts, "expert_type": m["expert_type"],
                        "blob_bytes": b.st.blob_size, "expert_bytes": b.expert_bytes,
                        "gguf_bytes": b.gguf.stat().st_size}
        if capped_ok:
            cgroup.drop_caches()
        models[name]["reads"] = read_rates(b, m["top_k"], args.read_rounds, 0.5 if args.quick else 2.0)
        rr = models[name]["reads"]
        if "error" not in rr:
            print(f"{name}: O_DIRECT expert reads: GGUF in place {rr['gguf']['bytes_s_median'] / 1e9:.2f} GB/s, store "
                  f"{rr['store']['bytes_s_median'] / 1e9:.2f} GB/s with its checksums ({rr['gguf_over_store']:.2f}x), "
                  f"{rr['store_unverified']['bytes_s_median'] / 1e9:.2f} GB/s without", flush=True)
        for c in [x.strip() for x in args.configs.split(",") if x.strip()]:
            if c != "none" and not capped_ok:
                continue
            cap = None if c == "none" else args.cap_base_mib * MIB + int(b.expert_bytes * int(c[1:]) / 100)
            key = f"{name} {c}"
            runs[key] = {e: [] for e in engines}
            for rep in range(args.repeats):
                for engine in engines[rep % len(engines):] + engines[: rep % len(engines)]:  # rotate who goes first
                    r = run_worker(engine, worker_cfg(engine, b, args, cap), cap, args.timeout, args, cap_after_load=True)
                    runs[key][engine].append(r)
                    got = r.get("error") or f"{r['tokens_per_s']:.2f} tok/s"
                    print(f"{key} {engine} #{rep}: {got}", flush=True)
            summary[key] = {e: summarize(rs) for e, rs in runs[key].items()}
            s = summary[key]
            g, st = s["moemesh-gguf"].get("tokens_per_s"), s["moemesh-store"].get("tokens_per_s")
            s["gguf_over_store"] = g / st if g and st else None
            if "llama.cpp" in s and s["llama.cpp"].get("tokens_per_s") and g:
                s["gguf_over_llama"] = g / s["llama.cpp"]["tokens_per_s"]
    result = {"bench": "native_formats", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "bench/native_formats.py " + shlex.join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "settings": vars(args), "models": models, "summary": summary, "runs": runs, "notes": notes,
              "wall_s": time.time() - t_start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(result))
    print(out.with_suffix(".md").read_text())


def markdown(r: dict) -> str:
    lines = [f"# native formats ({r['date']})", "", f"`{r['command']}`; load {r['machine']['loadavg_before'][0]:.1f} before, "
             f"{r['machine']['loadavg_after'][0]:.1f} after; {r['wall_s'] / 60:.1f} min", ""]
    lines += [f"- note: {n}" for n in r["notes"]]
    for name, m in r["models"].items():
        lines.append(f"- {name}: {m['layers']} layers x {m['experts']} {m['expert_type']} experts "
                     f"({m['blob_bytes'] / MIB:.2f} MiB each, {m['expert_bytes'] / 2**30:.2f} GiB), GGUF "
                     f"{m['gguf_bytes'] / 2**30:.2f} GiB")
        rr = m.get("reads") or {}
        if "gguf" in rr:
            lines.append(f"  - I/O alone (a layer's top-k random experts at once, O_DIRECT, finish included, medians of "
                         f"alternating rounds): GGUF in place {rr['gguf']['bytes_s_median'] / 1e9:.2f} GB/s, store "
                         f"{rr['store']['bytes_s_median'] / 1e9:.2f} GB/s with its xxh3 checks ({rr['gguf_over_store']:.2f}x), "
                         f"{rr['store_unverified']['bytes_s_median'] / 1e9:.2f} GB/s without "
                         f"({rr['gguf_over_store_unverified']:.2f}x)")
    lines += ["", "| model, config | engine | tok/s (median) | runs | hit rate | MiB read/token | peak RSS MiB | errors |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for key, s in r["summary"].items():
        for e, v in s.items():
            if not isinstance(v, dict):
                continue
            fmt = lambda x, f="{:.2f}": "-" if x is None else f.format(x)  # noqa: E731
            lines.append(f"| {key} | {e} | {fmt(v.get('tokens_per_s'))} | {v['ok']}/{v['runs']} | {fmt(v.get('hit_rate'))} | "
                         f"{fmt((v.get('bytes_read_per_token') or 0) / MIB if v.get('bytes_read_per_token') else None, '{:.1f}')} | "
                         f"{fmt((v.get('peak_rss_bytes') or 0) / MIB if v.get('peak_rss_bytes') else None, '{:.0f}')} | "
                         f"{'; '.join(v['errors'])[:80]} |")
        ratio = s.get("gguf_over_store")
        lines.append(f"| {key} | direct / store | {'-' if ratio is None else f'{ratio:.2f}x'} | | | | | |")
        if s.get("gguf_over_llama"):
            lines.append(f"| {key} | direct / llama.cpp | {s['gguf_over_llama']:.2f}x | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
