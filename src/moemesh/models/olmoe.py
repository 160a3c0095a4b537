"""olmoe: q/k RMSNorm over the whole projection (not per head), optional clip_qkv; its GGUF (``olmoe``)."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, routed_args
from .gguf import QK_NORMS, GGUFSpec, Meta, Shapes, base_config, moe_block, moe_config
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    every = list(range(int(cfg["num_hidden_layers"])))  # every layer sparse
    return ModelArgs(**routed_args(cfg, "olmoe", every, "intermediate_size", False),
                     qk_norm="full", clip_qkv=cfg.get("clip_qkv"))


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    config = base_config("olmoe", meta, shapes)
    moe = moe_config("olmoe", meta, shapes, "experts.0.gate_proj.weight")
    config.update(architectures=["OlmoeForCausalLM"], num_experts=moe["num_experts"],
                  num_experts_per_tok=moe["num_experts_per_tok"], intermediate_size=moe["moe_intermediate_size"],
                  norm_topk_prob=bool(meta("olmoe.expert_weights_norm", False)))
    return config


GGUF_BLOCK = moe_block(QK_NORMS)
GGUF = GGUFSpec("olmoe", "olmoe", GGUF_BLOCK, gguf_config)
ARCH = ArchSpec("olmoe", args_from_config, gguf=GGUF)
