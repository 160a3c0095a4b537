"""Per-layer cost of moemesh's eager decode step beyond its weight bytes, measured on this machine.

A decode step of an MoE layer runs a few dozen small torch ops and C calls (norms, rope, the KV
append, attention, the router, the fused experts) whose dispatch costs do not shrink with the
weights. ``moemesh plan``'s compute floor counts only matmul bytes, so without this term it
over-predicts uncapped decode (by ~50% on the Qwen3-shaped bench model). Measured here by running
the real model code (the qwen3_moe builder, int4 weights, resident experts, the fused expert
kernel) on two tiny random models that differ only in depth: per layer = (t_deep - t_shallow) /
(deep - shallow), so the embedding, head and per-step costs cancel.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
             num_experts_per_tok=8, moe_intermediate_size=128, intermediate_size=512, vocab_size=512)


class DictSource:
    """A WeightSource over an in-memory {HF name: tensor} dict (no int4 groups)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def int4_groups(self, name: str) -> None:
        return None


def tiny_qwen3_moe(layers: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random qwen3_moe checkpoint of SHAPE and `layers` layers: (config, HF-named tensors)."""
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": layers, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "max_position_embeddings": 4096, "norm_topk_prob": True, "tie_word_embeddings": False,
           "hidden_act": "silu", **SHAPE}
    g = torch.Generator().manual_seed(seed)
    d, hd, e, i = SHAPE["hidden_size"], SHAPE["head_dim"], SHAPE["num_experts"], SHAPE["moe_intermediate_size"]
    hq, hkv = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    t = {"model.embed_tokens.weight": rnd(SHAPE["vocab_size"], d), "model.norm.weight": torch.ones(d),
         "lm_head.weight": rnd(SHAPE["vocab_size"], d)}
    for n in range(layers):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": torch.ones(d), p + "post_attention_layernorm.weight": torch.ones(d),
                  p + "self_attn.q_proj.weight": rnd(hq * hd, d), p + "self_attn.k_proj.weight": rnd(hkv * hd, d),
                  p + "self_attn.v_proj.weight": rnd(hkv * hd, d), p + "self_attn.o_proj.weight": rnd(d, hq * hd),
                  p + "self_attn.q_norm.weight": torch.ones(hd), p + "self_attn.k_norm.weight": torch.ones(hd),
                  p + "mlp.gate.weight": rnd(e, d)})
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            t.update({q + "gate_proj.weight": rnd(i, d), q + "up_proj.weight": rnd(i, d), q + "down_proj.weight": rnd(d, i)})
    return cfg, t


def step_seconds(layers: int, steps: int, quant: str = "int4") -> float:
    """Median seconds of one single-token decode step of the tiny model at this depth."""
    from ..batch import BatchLayout
    from ..models import get_arch
    from ..models.build import make_builder

    cfg, tensors = tiny_qwen3_moe(layers)
    spec = get_arch("qwen3_moe")
    model = make_builder(spec, spec.args_from_config(cfg), DictSource(tensors), quant).build(None)
    kv = model.new_cache()
    kv.add_sequence(0)
    lay = BatchLayout([0], [1])
    times = []
    for pos in range(steps + 4):
        t0 = time.perf_counter()
        model(torch.tensor([pos % SHAPE["vocab_size"]]), torch.tensor([pos]), kv, lay)
        if pos >= 4:  # first steps: lazy library loads, allocator warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_overhead(steps: int = 40, shallow: int = 2, deep: int = 8) -> dict[str, float]:
    """Seconds per decode layer of the eager step beyond its weight bytes (see the module doc)."""
    t_shallow, t_deep = step_seconds(shallow, steps), step_seconds(deep, steps)
    return {"layer_s": max(0.0, (t_deep - t_shallow) / (deep - shallow)), "step_s_shallow": t_shallow,
            "step_s_deep": t_deep, "layers": [shallow, deep]}
