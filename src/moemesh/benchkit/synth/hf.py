"""An HF checkpoint (safetensors) of a synthetic benchkit/synth/models.py model, written from its expert
store, so transformers runs the same weights as moemesh and llama.cpp. Every architecture there:
Qwen3MoeForCausalLM, MixtralForCausalLM, GptOssForCausalLM, DeepseekV3ForCausalLM.

    MODEL_DIR/hf/
      config.json                         the store manifest's config (an HF config already)
      model-00001-of-0000N.safetensors    embedding, final norm, head (bf16, as stored)
      model-0000K-of-0000N.safetensors    layer K-2: its trunk tensors (bf16) + its experts (fp32)
      model.safetensors.index.json
      DONE                                written last; the directory appears by one rename
      check.json                          `--check`'s result (the weight and logit check below)

Trunk tensors are copied from trunk.safetensors unchanged (bf16 and fp32 as stored, HF names:
routers, shared experts, DeepSeek's e_score_correction_bias and MLA projections, gpt-oss's sinks
and biases). Experts are dequantized from the store's int4 blobs by moemesh's own code
(``ExpertStore.read_expert`` -> ``QuantLinear.dequantized_weight()``, fp32; gpt-oss's fp32 biases
as stored), and gate_up's rows split into gate (first half) and up, the order in which the store
packs them and moemesh's experts consume them (``gate, up = gate_up(x).chunk(2)``). fp32 holds
every expert weight ``(q - 8) * d`` exactly (bf16 would not), i.e. the very values moemesh's int4
kernel and llama.cpp's Q4_0 use. The expert names and layout are those of each architecture's
published checkpoints (benchkit/synth/hf_arch.py): per-expert tensors for Qwen3 / DeepSeek-V3
(``mlp.experts.E.gate_proj.weight``) and Mixtral (``block_sparse_moe.experts.E.w1``), fused and
gate/up-interleaved ``mlp.experts.gate_up_proj`` [E, D, 2I] + biases for gpt-oss.

Every shard is streamed: its header is computed from the shapes, then tensors are written one at
a time (one expert dequantized at a time; gpt-oss's fused tensors one expert slice at a time), so
peak memory is about one expert, not one layer. Sizes (fp32 experts per MoE layer): Qwen3-30B-A3B
2.4 GB, Mixtral-8x7B 5.6 GB, gpt-oss-120b 12.7 GB, DeepSeek-V3 45 GB; benchkit/synth/hf_size.py
refuses, before writing, a checkpoint the disk or transformers' RAM cannot hold (DeepSeek-V3 at
any depth on a 24 GB machine).

    .venv/bin/python benchkit/synth/hf.py [--model mixtral-8x7b] --layers 2 [--check]

``--check`` loads the directory with transformers and compares (1) one expert per MoE layer with
the store's dequantized weights (must be equal, biases included) and (2) transformers' logits for
a few teacher-forced tokens with moemesh's ``load_model(store, "fp32")`` (trunk kept fp32, experts
the store's int4 through moemesh's kernels), reporting the max relative logit difference.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import core as synth
from . import hf_arch as synth_hf_arch
from . import hf_size as synth_hf_size

HF_VERSION = 1  # bump when the written layout changes (invalidates cached hf/ directories)
ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
EXPERT_PARTS = synth_hf_arch.PARTS


def hf_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "hf"


def expert_tensors(store, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """gate_proj [I, D], up_proj [I, D], down_proj [D, I] (+ gpt-oss's biases), fp32, exactly the
    weights moemesh uses."""
    return synth_hf_arch.store_expert(store, layer, expert)


def _write_shard(path: Path, spec: list[tuple[str, torch.dtype, list[int]]],
                 tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Write a safetensors file whose header is ``spec`` (name, dtype, shape) from ``tensors``,
    produced lazily in the same order, each whole or as consecutive slices along its first axis
    (each checked against the spec). Returns the data bytes."""
    header, offset = {}, 0
    for name, dtype, shape in spec:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    it = iter(tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in spec:
            rows = 0
            while rows < shape[0]:  # one whole tensor, or its slices [k, *shape[1:]] in order
                got, t = next(it, (None, None))
                if got != name or t.dtype != dtype or list(t.shape[1:]) != list(shape[1:]) or rows + t.shape[0] > shape[0]:
                    raise RuntimeError(f"{path.name}: produced {got} {getattr(t, 'dtype', None)} "
                                       f"{list(getattr(t, 'shape', []))} at row {rows}, header says {name} {dtype} {shape}")
                f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                rows += t.shape[0]
        if next(it, None) is not None:
            raise RuntimeError(f"{path.name}: produced more tensors than the header holds")
        f.flush()
        os.fsync(f.fileno())
    return offset


def build_hf(model_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Write (or reuse) MODEL_DIR/hf from MODEL_DIR/store; returns the directory."""
    from moemesh.store.expert_store import ExpertStore
    from moemesh.weights.safetensors_io import SafetensorsFile

    model_dir = Path(model_dir)
    out = hf_dir(model_dir)
    if (out / "DONE").is_file() and json.loads((out / "DONE").read_text()).get("hf_version") == HF_VERSION:
        return out
    store = ExpertStore(model_dir / "store")
    cfg = dict(store.config)
    arch = synth_hf_arch.layout(cfg["model_type"])
    synth_hf_size.require_fits(cfg, model_dir)  # before writing anything
    trunk = SafetensorsFile(store.trunk_path)
    layers, n_exp = cfg["num_hidden_layers"], store.num_experts
    first = store.read_expert(store.moe_layers[0], 0)  # the widths as stored
    inter, d = first.gate_up.out_features // 2, first.gate_up.in_features
    n_shards = layers + 1
    fname = lambda k: f"model-{k:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731

    t0 = time.time()
    weight_map, total = {}, 0
    done = {"hf_version": HF_VERSION, "store": str(store.root)}
    with synth.atomic_dir(out, done) as tmp:
        # shard 1: embedding, final norm, head
        top = [n for n in trunk.names() if not n.startswith("model.layers.")]
        spec = [(n, trunk.entries[n][0], trunk.entries[n][1]) for n in top]
        total += _write_shard(tmp / fname(1), spec, ((n, trunk.get(n)) for n in top))
        weight_map.update({n: fname(1) for n in top})
        # one shard per layer: its trunk tensors as stored, then its experts (if MoE), streamed
        for i in range(layers):
            names = [n for n in trunk.names() if n.startswith(f"model.layers.{i}.")]
            moe = i in store.moe_layers
            spec = [(n, trunk.entries[n][0], trunk.entries[n][1]) for n in names]
            spec += arch.spec(i, n_exp, d, inter) if moe else []

            def produce(i=i, names=names, moe=moe):
                for n in names:
                    yield n, trunk.get(n)
                if moe:
                    yield from arch.produce(store, i)

            f = fname(i + 2)
            total += _write_shard(tmp / f, spec, produce())
            weight_map.update({n: f for n, _, _ in spec})
            log(f"  hf: layer {i + 1}/{layers} written ({time.time() - t0:.0f} s)")
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        done["bytes"] = total  # DONE is written when the block ends
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


# --------------------------------------------------------------------------- the check
def check(model_dir: Path, n_tokens: int = 4, threads: int = 2) -> dict:
    """Load hf/ with transformers: one expert per layer equal to the store's dequantized weights,
    and logits of ``n_tokens`` teacher-forced steps close to moemesh's fp32-trunk model."""
    import random

    from transformers import AutoModelForCausalLM

    from moemesh.batch import BatchLayout
    from moemesh.loading.loader import load_model
    from moemesh.store.expert_store import ExpertStore

    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    store = ExpertStore(model_dir / "store")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir(model_dir), dtype=torch.float32).eval()
    arch = synth_hf_arch.layout(store.config["model_type"])
    n_exp = store.num_experts
    experts = {}
    for i in store.moe_layers:
        e = (7 * i + 5) % n_exp
        want = expert_tensors(store, i, e)
        got = arch.from_model(hf, i, e)
        experts[f"{i}.{e}"] = {p: bool(set(got) == set(want) and torch.equal(got[p], want[p])) for p in want}
    rng = random.Random(7)
    tokens = [rng.randrange(3, store.config["vocab_size"]) for _ in range(n_tokens)]
    ref_hf = []
    with torch.inference_mode():
        past = None
        for tok in tokens:
            o = hf(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = o.past_key_values
            ref_hf.append(o.logits[0, -1].float())
    impl = getattr(hf.config, "_experts_implementation", None)
    type_name = type(hf).__name__
    del hf, past
    loaded = load_model(str(store.root), "fp32")
    model = loaded.model
    modes = sorted({m.mode for m in model.modules() if type(m).__name__ == "QuantLinear"})  # the trunk (experts: the provider)
    cache = model.new_cache()
    cache.add_sequence(0)
    layout = BatchLayout([0], [1])
    mm = []
    with torch.inference_mode():
        for i, tok in enumerate(tokens):
            mm.append(model(torch.tensor([tok]), torch.tensor([i]), cache, layout)[0].float())
    steps = []
    for a, b in zip(ref_hf, mm):
        steps.append({"max_rel_diff": float((a - b).abs().max() / b.abs().max()),
                      "max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(b.abs().max()),
                      "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                      "top1_agree": bool(a.argmax() == b.argmax())})
    import transformers

    return {"model_type": store.config["model_type"], "hf_class": type_name,
            "experts_equal": experts, "all_experts_equal": all(all(v.values()) for v in experts.values()),
            "tokens": tokens, "steps": steps, "max_rel_diff": max(s["max_rel_diff"] for s in steps),
            "top1_agree": all(s["top1_agree"] for s in steps),
            "moemesh": "load_model(store, 'fp32')", "moemesh_trunk_modes": modes,
            "transformers": transformers.__version__, "experts_implementation": impl,
            "definition": "max_rel_diff = max |logit_hf - logit_moemesh| / max |logit_moemesh|, per step"}


def ensure(model_dir: Path, log: Callable[[str], None] = print, run_check: bool = True) -> tuple[Path, dict | None]:
    """build_hf, then (once, cached in hf/check.json) the check in a subprocess of its own, so the
    caller's memory never holds the models."""
    out = build_hf(model_dir, log)
    res = None
    if run_check:
        path = out / "check.json"
        if not path.is_file():
            log("  hf: checking the checkpoint with transformers against the store and moemesh ...")
            r = subprocess.run([sys.executable, str(Path(__file__)), "--check-dir", str(model_dir)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"synth_hf check failed:\n{r.stderr[-3000:]}")
        res = json.loads(path.read_text())
        if not res["all_experts_equal"]:
            raise SystemExit(f"{out}: transformers' expert weights differ from the store's: {res['experts_equal']}")
    return out, res


def _write_check(model_dir: Path) -> dict:
    res = check(model_dir)
    path = hf_dir(model_dir) / "check.json"
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=1))
    os.rename(tmp, path)
    return res


if __name__ == "__main__":
    import argparse

    from . import models as synth_models
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(synth_models.MODELS), default="qwen3-30b-a3b")
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, help="default: the model's (benchkit/synth/models.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="(re)run the transformers check, print it")
    ap.add_argument("--check-dir", help=argparse.SUPPRESS)  # ensure()'s subprocess: check MODEL_DIR, write check.json
    a = ap.parse_args()
    if a.check_dir:
        _write_check(Path(a.check_dir))
        sys.exit(0)
    m = synth_models.MODELS[a.model]
    if not (hf_dir(synth_models.model_dir(Path(a.work_dir), a.model, a.layers, a.vocab or m.vocab, a.seed)) / "DONE").is_file():
        synth_hf_size.require_fits(m.config(a.layers, a.vocab or m.vocab), Path(a.work_dir))  # before the store, too
    root = synth_models.build(Path(a.work_dir), a.model, a.layers, a.vocab, a.seed)
    out = build_hf(root)
    print(out)
    if a.check:
        print(json.dumps(_write_check(root), indent=1))
