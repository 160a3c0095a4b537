"""minimax_m2 (MiniMax-M2 / M2.1): GQA with partial rotary (``rotary_dim`` of each head) and
q/k RMSNorm over the whole projection (as olmoe), every layer sparse, Mixtral's expert names
(w1 gate, w3 up, w2 down), and a sigmoid router whose choice adds a learned correction bias
(``block_sparse_moe.e_score_correction_bias``) while the weights are the unbiased scores,
renormalised: DeepSeek-V3's routing with a single group (layers/grouped_router.py).
"""
from __future__ import annotations

from typing import Any

from ..errors import UnsupportedArchitecture
from ..layers.grouped_router import GroupedRouting
from .args import ModelArgs, common_args, num_experts_of, rotary_dim_of
from .shape import standard_shape
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    if cfg.get("scoring_func", "sigmoid") != "sigmoid" or cfg.get("use_qk_norm", True) is False:
        raise UnsupportedArchitecture("minimax_m2: only sigmoid routing with q/k norms (as released) is supported")
    common = common_args(cfg, "minimax_m2")
    n_experts = num_experts_of(cfg)
    return ModelArgs(
        **common,
        qk_norm="full",
        num_experts=n_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=True,
        moe_layers=list(range(common["num_layers"])),
        rotary_dim=rotary_dim_of(cfg, common["head_dim"]),
        routing=GroupedRouting(scoring="sigmoid", method="noaux_tc", norm_topk_prob=True),
    )


ARCH = ArchSpec("minimax_m2", args_from_config, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                router_bias="e_score_correction_bias",
                shape=lambda args, cfg, name: standard_shape(args, name, router_bias=True))
