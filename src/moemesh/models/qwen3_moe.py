"""qwen3_moe: per-head q/k RMSNorm, softmax-then-top-k router with ``norm_topk_prob``."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, common_args, num_experts_of
from .spec import ArchSpec


def moe_layers(cfg: dict[str, Any], num_experts: int) -> list[int]:
    """Qwen MoE: layer i is sparse unless listed in mlp_only_layers or off the sparse step."""
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(int(cfg["num_hidden_layers"])) if num_experts > 0 and i not in dense and (i + 1) % step == 0]


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    bias = bool(cfg.get("attention_bias", False))
    num_experts = num_experts_of(cfg)
    return ModelArgs(
        **common_args(cfg, "qwen3_moe"),
        attention_bias=bias,
        o_bias=bias,
        qk_norm="head",
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=moe_layers(cfg, num_experts),
    )


ARCH = ArchSpec("qwen3_moe", args_from_config)
