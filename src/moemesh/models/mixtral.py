"""mixtral: every layer sparse, top-k renormalised, experts named w1 (gate), w3 (up), w2 (down)."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, common_args, num_experts_of
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    num_experts = num_experts_of(cfg)
    return ModelArgs(
        **common_args(cfg, "mixtral"),
        sliding_window=cfg.get("sliding_window"),
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=True,
        moe_layers=list(range(int(cfg["num_hidden_layers"]))),
    )


ARCH = ArchSpec("mixtral", args_from_config, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"))
