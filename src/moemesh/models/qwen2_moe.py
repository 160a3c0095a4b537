"""qwen2_moe: q/k/v biases and a shared expert scaled by sigmoid(x @ g)."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, common_args, num_experts_of
from .qwen3_moe import moe_layers
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    num_experts = num_experts_of(cfg)
    if cfg.get("use_sliding_window"):
        from ..errors import UnsupportedArchitecture

        raise UnsupportedArchitecture("qwen2_moe with use_sliding_window is not supported yet")
    return ModelArgs(
        **common_args(cfg, "qwen2_moe"),
        attention_bias=bool(cfg.get("qkv_bias", True)),
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe_layers(cfg, num_experts),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0)),
        shared_expert_gate=True,
    )


ARCH = ArchSpec("qwen2_moe", args_from_config)
