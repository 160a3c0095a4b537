"""An HF checkpoint (Qwen3MoeForCausalLM, safetensors) of a synthetic bench/synth.py model, written
from its expert store, so transformers runs the same weights as moemesh and llama.cpp.

    MODEL_DIR/hf/
      config.json                         the store manifest's config (model_type qwen3_moe)
      model-00001-of-0000N.safetensors    embedding, final norm, head (bf16, as stored)
      model-0000K-of-0000N.safetensors    layer K-2: its trunk tensors (bf16) + its experts (fp32)
      model.safetensors.index.json
      DONE                                written last; the directory appears by one rename
      check.json                          `--check`'s result (the weight and logit check below)

Trunk tensors are copied from trunk.safetensors unchanged (bf16, HF names). Experts are
dequantized from the store's int4 blobs by moemesh's own code (``ExpertStore.read_expert`` ->
``QuantLinear.dequantized_weight()``, fp32), and gate_up's rows split into gate_proj (first
moe_intermediate_size rows) and up_proj (the rest), the order in which bench/synth.py packs them
and GatedMLP consumes them (``gate, up = gate_up(x).chunk(2)``). fp32 holds every expert weight
``(q - 8) * d`` exactly, i.e. the very values moemesh's int4 kernel and llama.cpp's Q4_0 use; the
names are the per-expert ones of the published Qwen3 checkpoints (``mlp.experts.E.gate_proj.weight``;
transformers 5 stacks them into its fused ``gate_up_proj`` at load).

Every shard is streamed: its header is computed from the shapes, then tensors are written one at
a time (one expert dequantized at a time), so peak memory is about one expert, not one layer.
Size: 3 x 768 x 2048 x 4 B x 128 experts = 2.25 GiB per layer (12 layers: ~29 GB): meant for a
shallow model (``bench/lazy.py --layers 2 --transformers``: ~4.8 GB).

    .venv/bin/python bench/synth_hf.py --layers 2 [--check]

``--check`` loads the directory with transformers and compares (1) one expert per MoE layer with
the store's dequantized weights (must be equal) and (2) transformers' logits for a few
teacher-forced tokens with moemesh's ``load_model(store, "fp32")`` (trunk kept fp32, experts the
store's int4 through moemesh's kernels), reporting the max relative logit difference.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HF_VERSION = 1  # bump when the written layout changes (invalidates cached hf/ directories)
ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")


def hf_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "hf"


def expert_tensors(store, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """gate_proj [I, D], up_proj [I, D], down_proj [D, I], fp32, exactly the weights moemesh uses."""
    mlp = store.read_expert(layer, expert)
    gu = mlp.gate_up.dequantized_weight()  # [2I, D] fp32: gate rows then up rows (GatedMLP: chunk(2))
    inter = gu.shape[0] // 2
    return {"gate_proj": gu[:inter], "up_proj": gu[inter:], "down_proj": mlp.down.dequantized_weight()}


def _write_shard(path: Path, spec: list[tuple[str, torch.dtype, list[int]]],
                 tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
    """Write a safetensors file whose header is ``spec`` (name, dtype, shape) from ``tensors``,
    produced lazily in the same order (each checked against the spec). Returns the data bytes."""
    header, offset = {}, 0
    for name, dtype, shape in spec:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, dtype, shape), (got, t) in zip(spec, tensors, strict=True):
            if got != name or t.dtype != dtype or list(t.shape) != list(shape):
                raise RuntimeError(f"{path.name}: produced {got} {t.dtype} {list(t.shape)}, header says {name} {dtype} {shape}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return offset


def build_hf(model_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Write (or reuse) MODEL_DIR/hf from MODEL_DIR/store; returns the directory."""
    from moemesh.experts.store import ExpertStore
    from moemesh.weights.safetensors_io import SafetensorsFile

    model_dir = Path(model_dir)
    out = hf_dir(model_dir)
    if (out / "DONE").is_file() and json.loads((out / "DONE").read_text()).get("hf_version") == HF_VERSION:
        return out
    store = ExpertStore(model_dir / "store")
    cfg = dict(store.config)
    if cfg.get("model_type") != "qwen3_moe" or store.expert_module is not None:
        raise SystemExit(f"{model_dir}: synth_hf writes Qwen3-MoE checkpoints only (store is {cfg.get('model_type')})")
    trunk = SafetensorsFile(store.trunk_path)
    layers, n_exp = cfg["num_hidden_layers"], store.num_experts
    d, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    if store.moe_layers != list(range(layers)):
        raise SystemExit(f"{model_dir}: expected every layer to be MoE, store has {store.moe_layers}")
    shapes = {"gate_proj": [inter, d], "up_proj": [inter, d], "down_proj": [d, inter]}
    n_shards = layers + 1
    fname = lambda k: f"model-{k:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731

    tmp = model_dir / f".hf.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    weight_map, total = {}, 0
    try:
        # shard 1: embedding, final norm, head
        top = [n for n in trunk.names() if not n.startswith("model.layers.")]
        spec = [(n, trunk.entries[n][0], trunk.entries[n][1]) for n in top]
        total += _write_shard(tmp / fname(1), spec, ((n, trunk.get(n)) for n in top))
        weight_map.update({n: fname(1) for n in top})
        # one shard per layer: its trunk tensors as stored, then its experts, one at a time
        for i in range(layers):
            names = [n for n in trunk.names() if n.startswith(f"model.layers.{i}.")]
            spec = [(n, trunk.entries[n][0], trunk.entries[n][1]) for n in names]
            spec += [(f"model.layers.{i}.mlp.experts.{e}.{p}.weight", torch.float32, shapes[p])
                     for e in range(n_exp) for p in EXPERT_PARTS]

            def produce(i=i, names=names):
                for n in names:
                    yield n, trunk.get(n)
                for e in range(n_exp):
                    for p, t in expert_tensors(store, i, e).items():
                        yield f"model.layers.{i}.mlp.experts.{e}.{p}.weight", t

            f = fname(i + 2)
            total += _write_shard(tmp / f, spec, produce())
            weight_map.update({n: f for n, _, _ in spec})
            log(f"  hf: layer {i + 1}/{layers} written ({time.time() - t0:.0f} s)")
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / "DONE").write_text(json.dumps({"seconds": time.time() - t0, "hf_version": HF_VERSION,
                                              "bytes": total, "store": str(store.root)}))
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


# --------------------------------------------------------------------------- the check
def check(model_dir: Path, n_tokens: int = 4, threads: int = 2) -> dict:
    """Load hf/ with transformers: one expert per layer equal to the store's dequantized weights,
    and logits of ``n_tokens`` teacher-forced steps close to moemesh's fp32-trunk model."""
    import random

    from transformers import AutoModelForCausalLM

    from moemesh.experts.store import ExpertStore
    from moemesh.layers.batch import BatchLayout
    from moemesh.models.loader import load_model

    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    store = ExpertStore(model_dir / "store")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir(model_dir), dtype=torch.float32).eval()
    n_exp = store.num_experts
    experts = {}
    for i in store.moe_layers:
        e = (7 * i + 5) % n_exp
        want = expert_tensors(store, i, e)
        got = _hf_expert(hf, i, e)
        experts[f"{i}.{e}"] = {p: bool(torch.equal(got[p], want[p])) for p in EXPERT_PARTS}
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

    return {"experts_equal": experts, "all_experts_equal": all(all(v.values()) for v in experts.values()),
            "tokens": tokens, "steps": steps, "max_rel_diff": max(s["max_rel_diff"] for s in steps),
            "moemesh": "load_model(store, 'fp32')", "moemesh_trunk_modes": modes,
            "transformers": transformers.__version__, "experts_implementation": impl,
            "definition": "max_rel_diff = max |logit_hf - logit_moemesh| / max |logit_moemesh|, per step"}


def _hf_expert(hf, layer: int, e: int) -> dict[str, torch.Tensor]:
    """One expert's gate/up/down from a loaded Qwen3MoeForCausalLM (transformers 5 fuses them into
    experts.gate_up_proj [E, 2I, D] (gate then up) and experts.down_proj [E, D, I]; 4.x keeps
    per-expert Linear modules)."""
    ex = hf.model.layers[layer].mlp.experts
    if hasattr(ex, "gate_up_proj"):
        gu = ex.gate_up_proj[e].detach()
        inter = gu.shape[0] // 2
        return {"gate_proj": gu[:inter], "up_proj": gu[inter:], "down_proj": ex.down_proj[e].detach()}
    m = ex[e]
    return {p: getattr(m, p).weight.detach() for p in EXPERT_PARTS}


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

    import synth

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", default="/work/bench-data")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="(re)run the transformers check, print it")
    ap.add_argument("--check-dir", help=argparse.SUPPRESS)  # ensure()'s subprocess: check MODEL_DIR, write check.json
    a = ap.parse_args()
    if a.check_dir:
        _write_check(Path(a.check_dir))
        sys.exit(0)
    root = synth.build(Path(a.work_dir), a.layers, a.vocab, a.seed)
    out = build_hf(root)
    print(out)
    if a.check:
        print(json.dumps(_write_check(root), indent=1))
