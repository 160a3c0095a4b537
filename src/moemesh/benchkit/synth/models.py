"""Synthetic MoE models with the real per-layer shapes of Qwen3-30B-A3B, Mixtral-8x7B, gpt-oss-120b
and DeepSeek-V3, written as a moemesh expert store (and, where llama.cpp's layout is simple, as a
Q4_0 GGUF with bit-identical expert weights). Depth and vocabulary are parameters.

Qwen3-30B-A3B is benchkit/synth/core.py's model, built by it unchanged (its cached data stays valid).
The others share its expert format (every weight ``(q - 8) * d``: a Q4_0 block and the int4
group-32 kernel format at once) and its trunk recipe (random bf16, quantized at load), with each
architecture's own HF config keys and tensor names so ``get_arch`` builds them:

* mixtral-8x7b: hidden 4096, 8 experts top-2, expert width 14336, 32/8 heads of 128. GGUF: arch
  ``llama`` with ``ffn_*_exps`` (q/k rows permuted as llama.cpp's converter does). Default depth
  7: at 4 layers a quarter of the experts (840 MiB, 8 blobs of 105 MiB) is below what moemesh's
  budget needs for trunk + runtime + one layer's two experts.
* gpt-oss-120b: hidden 2880, 128 experts top-4, expert width 2880, 64/8 heads of 64, q/k/v/o
  biases, attention sinks, sliding window 128 on even layers, biased router, expert biases
  (fp32 in the blobs), clamped SwiGLU. GGUF: arch ``gpt-oss`` with Q4_0 experts (the published
  GGUFs hold MXFP4, which cannot represent these weights) and fp32 expert biases.
* deepseek-v3: hidden 7168, 256 routed experts top-8 + 1 shared, expert width 2048, MLA (q_lora
  1536, kv_lora 512, rope 64, nope 128, v 128, 128 heads), sigmoid grouped routing (8 groups,
  top 4). Every layer is MoE (first_k_dense_replace 0: a dense layer would be an 18432-wide MLP
  the benchmark does not study). GGUF: arch ``deepseek2`` as convert_hf_to_gguf.py writes V3
  (kv_b split into per-head k_b/v_b, MLA and YaRN keys, sigmoid group routing; see
  benchkit/synth/gguf_deepseek.py). With one MoE layer moemesh's prefetch has no next layer to
  predict, so it never prefetches.

    .venv/bin/python benchkit/synth/models.py --model gpt-oss-120b [--layers 2] [--vocab 32768]
"""
from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from . import core as synth

SYNTH_VERSION = 1  # bump when the generated weights or layout of the non-qwen3 models change


from .configs import MODELS, TITLES, SynthModel  # noqa: E402,F401  (re-exported: bench scripts use them from here)


def model_dir(work_dir: Path, key: str, layers: int, vocab: int, seed: int) -> Path:
    if key == "qwen3-30b-a3b":
        return synth.model_dir(work_dir, layers, vocab, seed)
    return Path(work_dir) / f"{key}-synth-v{SYNTH_VERSION}-L{layers}-V{vocab}-s{seed}"


# --------------------------------------------------------------------------- trunk
def trunk_spec(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) of every non-expert tensor; kind: w | embed | norm | bias | sinks | zero."""
    mt, d, v = cfg["model_type"], cfg["hidden_size"], cfg["vocab_size"]
    out = [("model.embed_tokens.weight", (v, d), "embed"), ("model.norm.weight", (d,), "norm"),
           ("lm_head.weight", (v, d), "w")]
    for i in range(cfg["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        out += [(p + "input_layernorm.weight", (d,), "norm"), (p + "post_attention_layernorm.weight", (d,), "norm")]
        if mt == "deepseek_v3":
            h, ql, kl = cfg["num_attention_heads"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
            nope, rope, vd, e, si = (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"],
                                     cfg["n_routed_experts"], cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
            out += [(a + "q_a_proj.weight", (ql, d), "w"), (a + "q_a_layernorm.weight", (ql,), "norm"),
                    (a + "q_b_proj.weight", (h * (nope + rope), ql), "w"),
                    (a + "kv_a_proj_with_mqa.weight", (kl + rope, d), "w"), (a + "kv_a_layernorm.weight", (kl,), "norm"),
                    (a + "kv_b_proj.weight", (h * (nope + vd), kl), "w"), (a + "o_proj.weight", (d, h * vd), "w"),
                    (p + "mlp.gate.weight", (e, d), "w"), (p + "mlp.gate.e_score_correction_bias", (e,), "zero"),
                    (p + "mlp.shared_experts.gate_proj.weight", (si, d), "w"),
                    (p + "mlp.shared_experts.up_proj.weight", (si, d), "w"),
                    (p + "mlp.shared_experts.down_proj.weight", (d, si), "w")]
            continue
        h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        out += [(a + "q_proj.weight", (h * hd, d), "w"), (a + "k_proj.weight", (kv * hd, d), "w"),
                (a + "v_proj.weight", (kv * hd, d), "w"), (a + "o_proj.weight", (d, h * hd), "w")]
        if mt == "gpt_oss":
            e = cfg["num_local_experts"]
            out += [(a + f"{x}_proj.bias", (n,), "bias") for x, n in (("q", h * hd), ("k", kv * hd), ("v", kv * hd), ("o", d))]
            out += [(a + "sinks", (h,), "sinks"), (p + "mlp.router.weight", (e, d), "w"), (p + "mlp.router.bias", (e,), "bias")]
        else:  # mixtral
            out += [(p + "block_sparse_moe.gate.weight", (cfg["num_local_experts"], d), "w")]
    return out


def trunk_tensor(seed: int, index: int, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr((seed, 0, index)).encode()))  # one stream per tensor: order-independent
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float32)  # e_score_correction_bias: fp32 in the checkpoints
    x = torch.randn(*shape, generator=g)
    scale = {"embed": 1.0, "bias": 0.02, "sinks": 1.0}.get(kind, shape[-1] ** -0.5)
    if kind == "norm":
        return (1.0 + 0.1 * x).abs().to(torch.bfloat16)
    return (x * scale).to(torch.bfloat16)


# --------------------------------------------------------------------------- experts
def expert_dims(cfg: dict) -> tuple[int, int, bool]:
    """(hidden, expert width, biases)."""
    inter = cfg.get("moe_intermediate_size") if cfg["model_type"] == "deepseek_v3" else cfg["intermediate_size"]
    return cfg["hidden_size"], int(inter), cfg["model_type"] == "gpt_oss"


def expert_weights(seed: int, layer: int, expert: int, d: int, inter: int, bias: bool) -> dict:
    rng = np.random.Generator(np.random.PCG64([seed, 1, layer, expert]))
    w: dict = {"gate": synth.random_int4(inter, d, d, rng), "up": synth.random_int4(inter, d, d, rng),
               "down": synth.random_int4(d, inter, inter, rng)}
    if bias:
        w["gate_up_bias"] = (0.02 * rng.standard_normal(2 * inter)).astype(np.float32)  # [2I]: gate then up
        w["down_bias"] = (0.02 * rng.standard_normal(d)).astype(np.float32)  # [D]
    return w


def moe_layers(cfg: dict) -> list[int]:
    from moemesh.models import get_arch

    return get_arch(cfg["model_type"]).args_from_config(cfg).moe_layers


# --------------------------------------------------------------------------- build
def build(work_dir: Path, key: str, layers: int | None = None, vocab: int | None = None, seed: int = 0,
          log=print) -> Path:
    """Write (or reuse) DIR/store and, where supported, DIR/model.gguf; returns DIR."""
    m = MODELS[key]
    layers, vocab = layers or m.layers, vocab or m.vocab
    if key == "qwen3-30b-a3b":
        return synth.build(Path(work_dir), layers, vocab, seed, log=log)
    out = model_dir(work_dir, key, layers, vocab, seed)
    if (out / "DONE").is_file():
        if m.gguf_arch and not (out / "model.gguf").is_file():  # a store written before this arch had a GGUF
            add_gguf(out, m.config(layers, vocab), seed, m.gguf_arch, log)
        return out
    with synth.atomic_dir(out, {"synth_version": SYNTH_VERSION}) as tmp:
        (tmp / "store").mkdir()
        write(tmp, m.config(layers, vocab), seed, m.gguf_arch, log)
    return out


def write(tmp: Path, cfg: dict, seed: int, gguf_arch: str | None, log=print) -> None:
    from moemesh.loading.convert import blob_layout
    from moemesh.models import get_arch
    from moemesh.store.checksum import DEFAULT as CHECKSUM
    from moemesh.store.checksum import checksum_fn
    from moemesh.store.expert_source import ALIGN
    from moemesh.store.expert_store import FORMAT, VERSION
    from moemesh.weights.safetensors_io import write_safetensors

    from . import gguf_writer as synth_gguf

    spec = get_arch(cfg["model_type"])
    args = spec.args_from_config(cfg)
    t0 = time.time()
    trunk = [(name, trunk_tensor(seed, j, shape, kind)) for j, (name, shape, kind) in enumerate(trunk_spec(cfg))]
    write_safetensors(tmp / "store" / "trunk.safetensors", trunk)
    log(f"  trunk written ({time.time() - t0:.0f} s)")
    gw = open_gguf_writer(tmp / "model.gguf", gguf_arch, cfg, trunk, args.moe_layers) if gguf_arch else None
    del trunk
    d, inter, bias = expert_dims(cfg)
    first = synth.expert_linears_reference(expert_weights(seed, args.moe_layers[0], 0, d, inter, bias))
    metas, parts, blob_size = blob_layout(first)
    fast = synth.FastExperts(first)
    manifest_layers: dict[str, list[dict[str, int]]] = {}
    with open(tmp / "store" / "experts.bin", "wb") as f:
        blobs = synth.BlobAppender(f, fast, parts, blob_size, checksum_fn(CHECKSUM))
        for i in args.moe_layers:
            stacks: dict[str, np.ndarray] = {}
            entries = []
            for x in range(args.num_experts):
                w = expert_weights(seed, i, x, d, inter, bias)
                entries.append(blobs.entry(w, check=x == 0))
                if gw is not None:
                    stack_into(stacks, x, args.num_experts, synth_gguf.expert_arrays(gguf_arch, w))
            manifest_layers[str(i)] = entries
            if gw is not None:
                for p in synth_gguf.expert_parts(gguf_arch):
                    gw.write_tensor_data(stacks.pop(p))
            log(f"  layer {i + 1}/{cfg['num_hidden_layers']} experts written ({time.time() - t0:.0f} s)")
        f.flush()
        os.fsync(f.fileno())
    if gw is not None:
        gw.close()
    manifest = {
        "format": FORMAT, "version": VERSION, "model_type": args.model_type, "config": cfg, "quant": "int4",
        "checksum": CHECKSUM, "hidden_act": args.hidden_act, "alignment": ALIGN, "blob_size": blob_size,
        "linears": metas, "parts": parts, "trunk_file": "trunk.safetensors", "experts_file": "experts.bin",
        "layers": manifest_layers,
    }
    if (module := spec.expert_module(args)) is not None:  # gpt_oss: clamped SwiGLU
        manifest["expert_module"] = module
    with open(tmp / "store" / "manifest.json", "w") as f:  # last: its presence marks a finished store
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def stack_into(stacks: dict[str, np.ndarray], x: int, n: int, arrays: dict[str, np.ndarray]) -> None:
    """stacks[p][x] = arrays[p], the [n, ...] stacks allocated at x == 0: one layer's expert stacks
    are written whole, and at DeepSeek-V3's shape they are 6.3 GiB (no second copy from np.stack)."""
    for p, arr in arrays.items():
        if x == 0:
            stacks[p] = np.empty((n, *arr.shape), arr.dtype)
        stacks[p][x] = arr


def add_gguf(root: Path, cfg: dict, seed: int, arch: str, log=print, name: str = "model.gguf",
             float_trunk: bool = False) -> Path:
    """Write root/NAME for an existing store: the trunk from the store, the experts regenerated
    from the seed (the same weights the store's blobs hold). float_trunk: F32 trunk matrices
    instead of Q4_0 (bench/gguf_parity.py's exact-trunk check)."""
    from safetensors.torch import load_file

    from moemesh.models import get_arch

    from . import gguf_writer as synth_gguf

    t0 = time.time()
    trunk_file = load_file(root / "store" / "trunk.safetensors")
    trunk = [(n, trunk_file[n]) for n, _, _ in trunk_spec(cfg)]  # the declared order
    layers = get_arch(cfg["model_type"]).args_from_config(cfg)
    tmp = root / f".{name}.partial-{os.getpid()}"
    try:
        gw = open_gguf_writer(tmp, arch, cfg, trunk, layers.moe_layers, float_trunk)
        del trunk, trunk_file
        d, inter, bias = expert_dims(cfg)
        for i in layers.moe_layers:
            stacks: dict[str, np.ndarray] = {}
            for x in range(layers.num_experts):
                w = expert_weights(seed, i, x, d, inter, bias)
                stack_into(stacks, x, layers.num_experts, synth_gguf.expert_arrays(arch, w))
            for p in synth_gguf.expert_parts(arch):
                gw.write_tensor_data(stacks.pop(p))
            log(f"  gguf layer {i + 1}/{cfg['num_hidden_layers']} ({time.time() - t0:.0f} s)")
        gw.close()
        os.rename(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return root / name


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b")
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(Path(a.work_dir), a.model, a.layers, a.vocab, a.seed, log=lambda s: print(s, flush=True)))


def open_gguf_writer(path: Path, arch: str, cfg: dict, trunk: list, moe_layers: list[int], float_trunk: bool = False):
    """The synthetic GGUF writer of llama.cpp architecture ``arch`` (deepseek2 has its own module)."""
    from . import gguf_deepseek, gguf_writer

    if arch == "deepseek2":
        return gguf_deepseek.open_writer(path, cfg, trunk, moe_layers, float_trunk)
    return gguf_writer.open_writer(path, arch, cfg, trunk, moe_layers, float_trunk)
