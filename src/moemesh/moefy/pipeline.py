"""moefy(): a dense llama (GGUF or HF dir, or 'smollm2') -> a mixtral checkpoint directory.

Steps: dequantize to fp32 and run the calibration tokens through the dense model, recording each
layer's FFN input; per layer, cluster the intermediate neurons into equal experts (balanced
k-means on activation patterns), fit a linear router to each expert's output norm, split the
weights. The checkpoint is assembled in a temporary directory and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import MoemeshError
from ..loading.source import open_source, resolve_model_path
from ..models import get_arch
from ..models.build import Builder
from .calibrate import calibration_sequences, collect_ffn_inputs
from .cluster import balanced_kmeans, neuron_features
from .router_fit import fit_router, routing_error, topk_mask
from .split import DenseFFN, expert_outputs, members, split_experts
from .writer import mixtral_config, write_model, write_tokenizer

CALIBRATION_TEXT = ("moemesh/moefy/data: calib_prose.txt (prose written for the project) + calib_chats.json "
                    "(SmolLM2's own sampled answers to calib_prompts.txt); tests/data/kv_eval_essay.txt is held out")


@dataclass
class MoefyOptions:
    # defaults measured by bench/moefy_ppl.py on SmolLM2: no split within 5% of dense perplexity
    # keeps fewer than all experts; 32/28 is the best at 88% active and still answers "Paris"
    experts: int = 32
    top_k: int = 28
    router_scale: float = 1e-3  # std of the router logits over calibration: small = weights ~1/k
    calib_tokens: int = 4096
    holdout: float = 0.2  # last fraction of calibration tokens scores the routers (moefy.json)
    kmeans_iters: int = 12
    ridge: float = 0.1  # relative to the mean diagonal of x^T x; 1e-3 overfit (held-out error +0.04-0.06)
    dtype: str = "fp32"  # fp32 | bf16 (checkpoint weights)
    seed: int = 0


def _names(source: Any) -> list[str]:
    ckpt = source.ckpt
    return list(ckpt.tensors) if hasattr(ckpt, "tensors") else list(ckpt.names())


def _check(config: dict, opts: MoefyOptions, where: Path) -> None:
    if config.get("model_type") != "llama":
        raise MoemeshError(f"{where}: moefy splits dense llama models; this is {config.get('model_type')!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise MoemeshError(f"{where}: biases in attention or MLP have no place in a mixtral checkpoint")
    if (config.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
        raise MoemeshError(f"{where}: RoPE scaling is not supported by moefy")
    inter = int(config["intermediate_size"])
    if opts.experts < 1 or inter % opts.experts:
        raise MoemeshError(f"--experts {opts.experts} must divide the FFN width {inter}")
    if not 1 <= opts.top_k <= opts.experts:
        raise MoemeshError(f"--top-k {opts.top_k} must be between 1 and --experts {opts.experts}")
    if opts.dtype not in ("fp32", "bf16"):
        raise MoemeshError(f"--dtype must be fp32 or bf16, got {opts.dtype!r}")


def moefy_layer(x: torch.Tensor, ffn: DenseFFN, opts: MoefyOptions, n_train: int, seed: int):
    """x [N, D] FFN inputs -> (router weight [E, D], experts, stats of the held-out tokens)."""
    h = ffn.hidden(x)  # [N, I]
    labels = balanced_kmeans(neuron_features(h[:n_train], ffn.down), opts.experts, opts.kmeans_iters, seed)
    groups = members(labels, opts.experts)
    y = expert_outputs(h, ffn.down, groups)  # [E, N, D]
    norms = y.norm(dim=2).T  # [N, E]
    weight = fit_router(x[:n_train], norms[:n_train], opts.ridge)  # [E, D]
    scores = x @ weight.T  # [N, E]
    weight = weight * (opts.router_scale / scores[:n_train].std().clamp_min(1e-12))
    held = slice(n_train, None)
    stats = {
        "router_error": routing_error(y[:, held], topk_mask(scores[held], opts.top_k)),
        "oracle_error": routing_error(y[:, held], topk_mask(norms[held], opts.top_k)),
        "router_oracle_overlap": (topk_mask(scores[held], opts.top_k) & topk_mask(norms[held], opts.top_k)).sum().item()
        / max(1, scores[held].shape[0] * opts.top_k),
    }
    return weight, split_experts(ffn, labels, opts.experts, down_scale=float(opts.top_k)), stats


def moefy(src: str, out: str | Path, opts: MoefyOptions, progress: bool = True) -> Path:
    out = Path(out)
    if out.exists():
        raise MoemeshError(f"{out} already exists; remove it or choose another output directory")
    path = resolve_model_path(src)
    config, source, tokenizer = open_source(path)
    _check(config, opts, path)
    t0 = time.perf_counter()
    spec = get_arch("llama")
    args = spec.args_from_config(config)
    dense = Builder(spec, args, source, "fp32").build()  # the dequantized weights we compare against
    seqs = calibration_sequences(tokenizer, args.vocab_size, opts.calib_tokens, seed=opts.seed)
    total = sum(len(s) for s in seqs)
    bar = tqdm(total=total, desc="calibrate", unit="tok", disable=not progress)
    xs = collect_ffn_inputs(dense, seqs, on_seq=bar.update)
    bar.close()
    del dense
    n_train = max(1, int(total * (1 - opts.holdout))) if total > 1 else total
    mlp = [f"model.layers.{i}.mlp.{n}_proj.weight" for i in range(args.num_layers) for n in ("gate", "up", "down")]
    tensors = [(n, source.get(n)) for n in _names(source) if n not in set(mlp)]
    layer_stats = []
    for i in tqdm(range(args.num_layers), desc="layers", unit="layer", disable=not progress):
        ffn = DenseFFN(*(source.get(spec.dense_mlp(i, f"{n}_proj.weight")).float() for n in ("gate", "up", "down")))
        router, experts, stats = moefy_layer(xs[i], ffn, opts, n_train, opts.seed + i)
        xs[i] = torch.empty(0)  # free as we go
        layer_stats.append(stats)
        prefix = f"model.layers.{i}.block_sparse_moe."
        tensors.append((prefix + "gate.weight", router))
        for e, ex in enumerate(experts):
            tensors += [(f"{prefix}experts.{e}.w1.weight", ex.w1), (f"{prefix}experts.{e}.w3.weight", ex.w3),
                        (f"{prefix}experts.{e}.w2.weight", ex.w2)]
    provenance = {"source": str(path), **asdict(opts), "calibration_tokens": total,
                  "calibration_text": CALIBRATION_TEXT if tokenizer is not None else "seeded random token ids"}
    mconfig = mixtral_config(config, opts.experts, opts.top_k, provenance)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_model(tmp, mconfig, tensors, torch.float32 if opts.dtype == "fp32" else torch.bfloat16)
        write_tokenizer(tmp, path, tokenizer, config)
        report = {"options": provenance, "seconds": time.perf_counter() - t0, "layers": layer_stats,
                  "mean_router_error": sum(s["router_error"] for s in layer_stats) / len(layer_stats),
                  "mean_oracle_error": sum(s["oracle_error"] for s in layer_stats) / len(layer_stats)}
        (tmp / "moefy.json").write_text(json.dumps(report, indent=1))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
