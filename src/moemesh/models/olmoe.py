"""olmoe: q/k RMSNorm over the whole projection (not per head), optional clip_qkv."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, common_args, num_experts_of
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    bias = bool(cfg.get("attention_bias", False))
    num_experts = num_experts_of(cfg)
    return ModelArgs(
        **common_args(cfg, "olmoe"),
        attention_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=cfg.get("clip_qkv"),
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=list(range(int(cfg["num_hidden_layers"]))),
    )


ARCH = ArchSpec("olmoe", args_from_config)
