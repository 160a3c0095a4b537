"""The benchmark suites of bench/, as `moemesh bench run` knows them: one entry per published
result, with the arguments of the documented full run (README, the results' "command" keys).

A suite is a bench/ script run as a subprocess of this interpreter, from the checkout's root.
``{llama_python}`` and ``{work_dir}`` in arguments are filled in by the harness (benchkit/harness.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import MoemeshError

# Where the benchmarks find llama-cpp-python: a venv of its own, built from source once by `make peers`
# under the cache (MOEMESH_PEERS, default ~/.cache/moemesh/peers); MOEMESH_LLAMA_PYTHON overrides it.
DEFAULT_LLAMA_PYTHON = str(Path(os.environ.get("MOEMESH_PEERS", Path.home() / ".cache" / "moemesh" / "peers"))
                           / "llamacpp-venv" / "bin" / "python")
# bench/lazy.py's synthetic Qwen3-30B-A3B store (its --work-dir default, 12 layers, vocab 32768, seed 0)
SYNTH_STORE = "/work/bench-data/qwen3moe-synth-v2-L12-V32768-s0/store"
MOE_DEMO = str(Path.home() / ".cache" / "moemesh" / "smollm2-moe-16x15")  # `make run`'s MoE demo model
MOEFIED_16x8 = "{work_dir}/smol-16-8"  # SmolLM2 split into 16 experts, top-8 (masked_quality's real-weight model)
# the configs of the published bench/results/moefy_ppl.json (its meta.command)
MOEFY_CONFIGS = ("16/8,16/12,16/14,16/15,32/16,32/24,32/28,16/16,16/8@1.0,16/4,16/16@0.001,16/14@0.001,"
                 "16/15@0.001,32/28@0.001,16/14@0.0001,16/12@0.001")


@dataclass(frozen=True)
class Setup:
    """A prerequisite made once by a `moemesh` command, skipped when ``creates`` exists."""

    creates: str
    argv: tuple[str, ...]  # arguments of `python -m moemesh.cli`


@dataclass(frozen=True)
class Suite:
    name: str
    script: str  # relative to bench/
    what: str
    args: tuple[str, ...] = ()  # the documented full run
    results: tuple[str, ...] = ()  # files it (re)writes, relative to bench/ (results/..., ../README.md)
    llama_cpp: bool = False  # llama-cpp-python importable by --llama-python
    root: bool = False  # root + the cgroup-v1 memory controller (memory caps, page cache drops)
    minutes: float = 1.0  # rough wall time on the 2-core reference machine, data already built
    in_all: bool = True  # part of `moemesh bench run all` (the others are diagnostics or other machines')
    env: tuple[tuple[str, str], ...] = ()
    setup: Setup | None = None
    # the script's option naming llama.cpp's Python when its own default is DEFAULT_LLAMA_PYTHON
    # (bench/lazy.py): passed only for another Python, so the recorded command stays the documented one
    llama_flag: str = ""
    note: str = ""  # shown by --list after the description

    @property
    def needs(self) -> str:
        parts = (["llama.cpp"] if self.llama_cpp else []) + (["root+cgroup"] if self.root else [])
        return ", ".join(parts) or "-"


def _res(*names: str) -> tuple[str, ...]:
    return tuple(f"results/{n}" for n in names)


def _lazy(model: str, minutes: float) -> Suite:
    return Suite(f"lazy_{model}", "lazy.py", f"lazy experts vs llama.cpp under memory caps, {model} shapes",
                 ("--model", model, "--repeats", "3"), _res(*(f"lazy_{model}.{x}" for x in ("json", "md", "png"))),
                 llama_cpp=True, root=True, minutes=minutes, llama_flag="--llama-python")


# In `run all` order: quick and independent first; plan_check before the lazy suites (they read its
# machine probe, results/plan_check_probe.json); the plot and the README table last, from the results.
SUITES: tuple[Suite, ...] = (
    Suite("policies", "policies.py", "expert-cache eviction policies: hit rates on synthetic routing traces",
          results=_res("policies.json", "policies.md"), minutes=1),
    Suite("routing", "routing.py", "moefied SmolLM2's routing replayed through the expert cache",
          results=_res("routing.json", "routing.md"), minutes=2,
          note="reuses results/routing_trace.json.gz; `-- --retrace` needs ~/.cache/moemesh/smollm2-moe (`moemesh moefy smollm2 DIR`)"),
    Suite("kv_quality", "kv_quality.py", "TurboQuant KV quality: distortion, SmolLM2 perplexity, greedy agreement",
          results=_res("kv_quality.json", "kv_quality.md"), minutes=10),
    Suite("kv", "kv.py", "decode speed and KV bytes at 1K-8K context: dense vs TurboQuant",
          ("--threads", "1", "--steps", "24"), _res("kv.json", "kv.md"), minutes=2),
    Suite("moefy_ppl", "moefy_ppl.py", "perplexity of moefied SmolLM2 per (experts, top-k) vs dense",
          ("--configs", MOEFY_CONFIGS), _res("moefy_ppl.json", "moefy_ppl.md"), minutes=30,
          note="one moefy per config, 77-97 s each on 2 cores"),
    Suite("masked_quality", "masked_quality.py", "mesh masked mode: KL / top-1 vs exact, per shard count",
          ("--tokens", "128", "--seqs", "2", "--moefied", MOEFIED_16x8), _res("masked_quality.json", "masked_quality.md"),
          minutes=8, setup=Setup(MOEFIED_16x8, ("moefy", "smollm2", MOEFIED_16x8, "--experts", "16", "--top-k", "8"))),
    Suite("serve", "serve.py", "1/4/8 streaming HTTP clients on `moemesh serve` vs the engine alone",
          ("--rounds", "3", "--max-tokens", "64"), _res("serve.json", "serve.md"), minutes=5),
    Suite("soak", "soak.py", "2 hours of mixed load on `moemesh serve` of a lazy MoE under --ram: errors, latency, RSS slope",
          results=_res("soak.json", "soak.md"), minutes=125, in_all=False,
          note="`-- --duration 1800` for 30 minutes; `-- --quick` for 30 s"),
    Suite("prefix", "prefix.py", "prefix cache: agent loop of 5 turns over a 2,000-token prefix, TTFT with/without",
          ("--rounds", "3"), _res("prefix.json", "prefix.md"), minutes=6,
          setup=Setup(MOE_DEMO, ("moefy", "smollm2", MOE_DEMO, "--experts", "16", "--top-k", "15")),
          note="first run builds the MoE demo model as `make run` does (~1 min on a quiet machine)"),
    Suite("mesh", "mesh.py", "mesh on loopback: pipeline stages per-hop cost, expert-shard bytes per token",
          results=_res("mesh.json", "mesh.md"), minutes=15),
    Suite("mesh_capped", "mesh.py", "3 capped nodes (netns, netem, memory cgroups) vs 1, model ~3x a node's cap",
          ("--part", "capped", "--delays", "0,5,20", "--tokens", "32"), _res("mesh.json", "mesh.md"), root=True,
          minutes=60, note="first run builds the 12-layer synthetic Qwen3 (+10-20 min); netem falls back to the "
          "transport's test delay where the kernel lacks sch_netem"),
    Suite("mesh_wire", "mesh.py", "bf16 wire between stages: logits vs one process (real weights)",
          ("--part", "wire", "--wire-models", f"smollm2,{MOEFIED_16x8}"), _res("mesh.json", "mesh.md"), minutes=10,
          setup=Setup(MOEFIED_16x8, ("moefy", "smollm2", MOEFIED_16x8, "--experts", "16", "--top-k", "8"))),
    Suite("decode", "decode.py", "decode/prefill, moemesh's default path vs llama.cpp: SmolLM2, the demo MoE and the "
          "Qwen3/gpt-oss/Mixtral/DeepSeek-shaped synthetic models", ("--rounds", "3"),
          _res("decode.json", "decode.md") + ("../README.md",), llama_cpp=True, minutes=40,
          llama_flag="--llama-python", note="builds the synthetic models under /work/bench-data once (bench/lazy.py's)"),
    Suite("int4_kernel", "int4_kernel.py", "int4 matmul: moemesh's C kernel vs torch's on expert shapes",
          ("--passes", "9"), _res("int4_kernel.json", "int4_kernel.md"), minutes=2,
          env=(("OMP_WAIT_POLICY", "PASSIVE"),)),
    Suite("plan_check", "plan_check.py", "`moemesh plan` predictions vs measured capped decode (synthetic Qwen3)",
          ("--repeats", "5", "--tokens", "36"), _res("plan_check.json", "plan_check.md", "plan_check_probe.json"), root=True,
          minutes=10,
          note="first run builds the synthetic data in /work/bench-data (+10-20 min)"),
    Suite("lazy", "lazy.py", "lazy experts vs llama.cpp under memory caps, Qwen3-30B-A3B shapes (12 layers)",
          ("--omp-wait-policy", ""), results=_res("lazy.json", "lazy.md", "lazy.png"), llama_cpp=True, root=True, minutes=15,
          llama_flag="--llama-python"),
    _lazy("gpt-oss-120b", 6),
    _lazy("mixtral-8x7b", 15),
    _lazy("deepseek-v3", 6),  # llama.cpp's deepseek2 GGUF: benchkit/synth/gguf_deepseek.py
    Suite("native_formats", "native_formats.py", "GGUFs read in place (gpt-oss-120b MXFP4, Qwen3-30B-A3B Q4_K per-layer "
          "shapes) vs the same experts in a store vs llama.cpp, no cap and 25% cap",
          results=_res("native_formats.json", "native_formats.md"), llama_cpp=True, root=True, minutes=25,
          llama_flag="--llama-python", note="first run writes the two GGUFs (~4.8 GB) and their stores in /work/bench-data"),
    Suite("fullscale", "fullscale.py", "whole gpt-oss-120b (MXFP4, 62.8 GB) and Qwen3-30B-A3B (Q4_K, 17.2 GB) under "
          "8/16 GiB caps: moemesh (uniform + calibrated routing) vs llama.cpp on the same GGUF, disk floor, TTFT, plan",
          ("--cleanup",), _res("fullscale.json", "fullscale.md", "fullscale.png"), llama_cpp=True, root=True,
          minutes=120, in_all=False, llama_flag="--llama-python",
          note="writes each model once under $MOEMESH_BENCH_DATA or ~/.cache/moemesh/bench-data (gpt-oss-120b needs "
               "63 GB free; --cleanup deletes it before Qwen3's); `-- --quick` for tiny shapes (~3-5 min)"),
    Suite("plot_caps", "plot_caps.py", "plot: decode tok/s vs RAM cap per model, from the lazy results",
          results=_res("lazy_caps.png"), minutes=0.2),
    Suite("readme_table", "readme_table.py", "regenerate README.md's performance table from bench/results",
          results=("../README.md",), minutes=0.1),
    # not in `all`: print-only diagnostics, or numbers that need another suite's data first
    Suite("matmul", "matmul.py", "fp32/bf16 vs torch int8/int4 weight-only matmul GFLOP/s",
          results=_res("matmul.json", "matmul.md"), minutes=2, in_all=False),
    Suite("int4_decode", "int4_kernel.py", "decode steps with the C int4 kernel on vs off (resident synthetic store)",
          ("--decode", SYNTH_STORE), _res("int4_kernel_decode.json", "int4_kernel_decode.md"), minutes=5,
          in_all=False, env=(("OMP_WAIT_POLICY", "PASSIVE"),), note="needs the store `lazy` builds"),
    Suite("mla_decode", "mla_decode.py", "one DeepSeek MLA layer: latent vs per-head KV cache (prints only)",
          minutes=1, in_all=False),
    Suite("lazy_profile", "lazy_profile.py", "where a capped lazy decode step's time goes (prints a profile)",
          ("--cap-pct", "25", "--tokens", "24"), root=True, minutes=3, in_all=False),
    Suite("lazy_hf", "lazy.py", "lazy experts vs llama.cpp and transformers (fp32) on the same weights, 2-layer "
          "Qwen3-30B-A3B shapes, under memory caps",
          ("--layers", "2", "--transformers", "--configs", "none,q100,q150", "--repeats", "3", "--out", "bench/results/lazy_hf"),
          _res("lazy_hf.json", "lazy_hf.md", "lazy_hf.png"), llama_cpp=True, root=True, minutes=8, in_all=False,
          llama_flag="--llama-python",
          note="caps of 100%/150% of the experts: at 2 layers a quarter or half (180/360 MiB) is below moemesh's floor "
               "(--ram >= 535M); --out is relative to the checkout root (the cwd); first run builds the 2-layer data and "
               "its 4.8 GB fp32 HF checkpoint in /work/bench-data (+1-2 min)"),
    Suite("decode_split", "decode_split.py", "uncapped decode step split: fused experts / other int4 matmuls / rest",
          ("--compile",), results=_res("decode_split.json", "decode_split.md"), minutes=2, in_all=False,
          note="needs the store `lazy` builds"),
    Suite("page_out", "page_out.py", "RSS after a lazy load with and without paging out unused checkpoint pages",
          results=_res("page_out.json", "page_out.md"), minutes=1, in_all=False, note="needs the store `lazy` builds"),
)
BY_NAME = MappingProxyType({s.name: s for s in SUITES})


def select(names: list[str] | tuple[str, ...]) -> tuple[Suite, ...]:
    """Suite names (and ``all``: the documented full sequence) -> suites, in the order given,
    each once. An unknown name raises MoemeshError listing the known ones."""
    out: list[Suite] = []
    for name in names:
        if name == "all":
            picked = [s for s in SUITES if s.in_all]
        elif name in BY_NAME:
            picked = [BY_NAME[name]]
        else:
            raise MoemeshError(f"unknown benchmark suite {name!r}; known: all, {', '.join(BY_NAME)} "
                               "(`moemesh bench --list`)")
        out += [s for s in picked if s not in out]
    return tuple(out)
