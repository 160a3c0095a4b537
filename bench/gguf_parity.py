"""Does llama.cpp compute what moemesh computes on a synthetic GGUF? A tiny model of one of
benchkit/synth/models.py's architectures (real key sets, small widths) is written as a store and
twice as a GGUF: Q4_0 trunk (the benchmark's file) and F32 trunk. A teacher-forced token stream
is decoded one token at a time by llama.cpp (bench/lazy_llama.py in the llama-cpp-python venv)
and by moemesh, and the logits are compared step by step:

* ``q4``: moemesh int4 trunk (asymmetric group-32, quantized at load) vs llama.cpp Q4_0 trunk
  (symmetric, of the same bf16 values): what bench/lazy.py compares.
* ``f32``: moemesh fp32 trunk vs llama.cpp F32 trunk. The experts are bit-identical in both
  files, so what remains is arithmetic: llama.cpp quantizes a Q4_0 matmul's activations to Q8_0
  (8 bits per 32 values), moemesh's int4 kernel to ~15 bits (int4_kernel.h); llama.cpp keeps
  its KV cache in F16. A layout or semantics error (RoPE pairing, YaRN scale, kv_b split,
  routing) shows up here as a large gap. (At these widths int4/Q4_0 trunk noise is large: each
  engine's q4 run is about as far from its own f32 run as from the other engine's q4 run.)

    .venv/bin/python bench/gguf_parity.py --model deepseek-v3 [--steps 24] [--json OUT]

Needs llama-cpp-python in --llama-python's venv (not in CI: its test in
tests/test_synth_gguf_deepseek.py is marked slow and skips without it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from moemesh.benchkit.suites import DEFAULT_LLAMA_PYTHON  # noqa: E402
from moemesh.benchkit.synth import models as sm

LLAMA_PY = os.environ.get("MOEMESH_LLAMA_PYTHON") or DEFAULT_LLAMA_PYTHON  # `make peers` builds it
# tiny widths, the real key sets (every width a multiple of Q4_0's 32)
TINY = {
    "mixtral-8x7b": dict(hidden_size=128, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32),
    "gpt-oss-120b": dict(hidden_size=128, intermediate_size=64, num_local_experts=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, sliding_window=4),
    "deepseek-v3": dict(hidden_size=128, moe_intermediate_size=64, n_routed_experts=16, num_experts_per_tok=4,
                        num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=32, n_group=4, topk_group=2),
}

# --full-width: the real widths, fewer experts (the trunk at F32 is ~2.8 GB for DeepSeek-V3)
FEW_EXPERTS = {"mixtral-8x7b": {}, "gpt-oss-120b": dict(num_local_experts=16),
               "deepseek-v3": dict(n_routed_experts=32)}


def tiny_model(root: Path, key: str, layers: int = 2, vocab: int = 256, seed: int = 0, full_width: bool = False) -> dict:
    """Store, model.gguf (Q4_0 trunk) and model-f32.gguf (F32 trunk) under root; returns the config."""
    m = sm.MODELS[key]
    cfg = {**m.config(layers, vocab), **(FEW_EXPERTS if full_width else TINY)[key]}
    (root / "store").mkdir(parents=True)
    sm.write(root, cfg, seed, m.gguf_arch, log=lambda _: None)
    if key == "deepseek-v3":
        nonzero_score_bias(root, seed)
        sm.add_gguf(root, cfg, seed, m.gguf_arch, log=lambda _: None)  # again, from the changed trunk
    sm.add_gguf(root, cfg, seed, m.gguf_arch, log=lambda _: None, name="model-f32.gguf", float_trunk=True)
    return cfg


def nonzero_score_bias(root: Path, seed: int) -> None:
    """The synthetic e_score_correction_bias is zero; give it values (std 0.1, the spread of the
    sigmoid scores) so the check covers its use (choice only, not the weights) on both sides."""
    import torch
    from safetensors.torch import load_file

    from moemesh.weights.safetensors_io import write_safetensors

    path = root / "store" / "trunk.safetensors"
    trunk = load_file(path)  # an mmap: write a new file, then rename over it
    g = torch.Generator().manual_seed(seed + 7)
    for name, t in trunk.items():
        if name.endswith("e_score_correction_bias"):
            trunk[name] = 0.1 * torch.randn(t.shape, generator=g)
    write_safetensors(path.with_suffix(".tmp"), list(trunk.items()))
    path.with_suffix(".tmp").rename(path)
    (root / "model.gguf").unlink()


def llama_logits(gguf: Path, tokens: list[int], llama_python: str = LLAMA_PY, threads: int = 2,
                 repack: bool = True) -> np.ndarray:
    """[T, V] logits of llama.cpp decoding ``tokens`` one at a time (repack: its default CPU_REPACK
    buffers, as bench/lazy.py's uncapped runs; off saves a second copy of the Q4_0 weights)."""
    cfg = {"model": str(gguf), "tokens": tokens, "warmup": 0, "logits": len(tokens), "threads": threads, "n_ctx": 256,
           "repack": repack}
    out = subprocess.run([llama_python, str(HERE / "lazy_llama.py"), json.dumps(cfg)], capture_output=True, text=True,
                         timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"llama.cpp worker failed (rc {out.returncode}): {out.stderr[-2000:]}")
    return np.asarray(json.loads(line[7:])["logits"], dtype=np.float64)


def moemesh_logits(store: Path, tokens: list[int], quant: str) -> np.ndarray:
    """[T, V] logits of moemesh decoding ``tokens`` one at a time (all experts resident)."""
    import torch

    from moemesh.batch import BatchLayout
    from moemesh.loading.loader import load_model

    model = load_model(str(store), quant).model
    cache = model.new_cache()
    cache.add_sequence(0)
    layout = BatchLayout([0], [1])
    with torch.no_grad():
        rows = [model(torch.tensor([t]), torch.tensor([i]), cache, layout)[0] for i, t in enumerate(tokens)]
    return torch.stack(rows).double().numpy()


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """a: moemesh, b: llama.cpp, [T, V]. rel diff per step = max|a - b| / max|b|."""
    cos = [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    rel = [float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(a, b)]
    top = [bool(x.argmax() == y.argmax()) for x, y in zip(a, b)]
    return {"top1_agree": sum(top) / len(top), "top1": top, "cosine_min": min(cos), "cosine_mean": sum(cos) / len(cos),
            "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel)}


def run(key: str, steps: int = 24, llama_python: str = LLAMA_PY, work: Path | None = None, seed: int = 0,
        full_width: bool = False) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        root = Path(tmp)
        shape = dict(layers=1, vocab=32768, full_width=True) if full_width else {}
        cfg = tiny_model(root, key, seed=seed, **shape)
        rng = np.random.default_rng(1234)
        tokens = [int(t) for t in rng.integers(3, cfg["vocab_size"], steps)]
        mm = {q: moemesh_logits(root / "store", tokens, q) for q in ("int4", "fp32")}
        files = {"int4": "model.gguf", "fp32": "model-f32.gguf"}
        ll = {q: llama_logits(root / f, tokens, llama_python, repack=not full_width) for q, f in files.items()}
    # q4 / f32: the engines against each other; *_q4_vs_f32: each engine's trunk-quantization noise
    return {"model": key, "config": cfg, "steps": steps, "tokens": tokens,
            "q4": compare(mm["int4"], ll["int4"]), "f32": compare(mm["fp32"], ll["fp32"]),
            "moemesh_q4_vs_f32": compare(mm["int4"], mm["fp32"]), "llama_q4_vs_f32": compare(ll["int4"], ll["fp32"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(TINY), default="deepseek-v3")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--llama-python", default=LLAMA_PY)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--full-width", action="store_true",
                    help=f"1 layer of the real widths, vocab 32768, fewer experts ({FEW_EXPERTS}) instead of tiny widths")
    ap.add_argument("--work-dir", help="where the temporary model goes (default: the system temp dir)")
    a = ap.parse_args()
    r = run(a.model, a.steps, a.llama_python, Path(a.work_dir) if a.work_dir else None, full_width=a.full_width)
    for mode in ("q4", "f32", "moemesh_q4_vs_f32", "llama_q4_vs_f32"):
        c = r[mode]
        print(f"{mode:>18}: top-1 agree {c['top1_agree']:.3f}, cosine min {c['cosine_min']:.5f} mean "
              f"{c['cosine_mean']:.5f}, rel diff max {c['max_rel_diff']:.4f} mean {c['mean_rel_diff']:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
