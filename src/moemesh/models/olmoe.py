"""olmoe: q/k RMSNorm over the whole projection (not per head), optional clip_qkv; its GGUF (``olmoe``)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .args import ModelArgs, common_args, num_experts_of
from .gguf import ATTN, EXPERTS, GGUFSpec, Meta, Shapes, base_config, moe_config
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


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    config = base_config("olmoe", meta, shapes)
    moe = moe_config("olmoe", meta, shapes, "experts.0.gate_proj.weight")
    config.update(architectures=["OlmoeForCausalLM"], num_experts=moe["num_experts"],
                  num_experts_per_tok=moe["num_experts_per_tok"], intermediate_size=moe["moe_intermediate_size"],
                  norm_topk_prob=bool(meta("olmoe.expert_weights_norm", False)))
    return config


GGUF_BLOCK = MappingProxyType({
    **ATTN,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
    **{k: f"mlp.{v}" for k, v in EXPERTS.items()},
})
GGUF = GGUFSpec("olmoe", "olmoe", GGUF_BLOCK, gguf_config)
ARCH = ArchSpec("olmoe", args_from_config, gguf=GGUF)
