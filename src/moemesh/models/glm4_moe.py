"""glm4_moe (GLM-4.5 / 4.6 / 4.7): GQA with partial rotary (half of each head by default),
q/k/v biases, optional per-head q/k norms, DeepSeek-V3's sigmoid routing with a correction bias
(``noaux_tc``: group-limited top-k on the biased scores, unbiased weights renormalised and
scaled), shared experts, and dense FFNs in the first ``first_k_dense_replace`` layers.

The multi-token-prediction layer GLM checkpoints carry as ``model.layers.<num_hidden_layers>``
is not built (decoding uses the main layers, as transformers does).

Its GGUF (llama.cpp's ``glm4moe``, conversion/glm.py Glm4MoeModel): HF's q/k row order (NEOX
rope: no permutation), ``post_attention_norm`` for the FFN's norm, the rotary width as
``rope.dimension_count``, sigmoid gating with ``exp_probs_b`` as the correction bias; the MTP
block (``nextn.*`` tensors, block index ``num_hidden_layers`` and up) is skipped.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

from ..layers.grouped_router import GroupedRouting
from .args import ModelArgs, common_args, rotary_dim_of
from .gguf import ATTN, EXPERTS, GGUFSpec, Meta, Shapes, base_config, moe_config, need
from .shape import ModelShape, standard_shape
from .spec import ArchSpec

# transformers' Glm4MoeConfig defaults, for keys a config.json leaves out
DEFAULTS = dict(n_routed_experts=128, n_shared_experts=1, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=False, partial_rotary_factor=0.5,
                rms_norm_eps=1e-5)


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    cfg = {**DEFAULTS, **cfg}
    common = common_args(cfg, "glm4_moe")
    n_layers, n_experts = common["num_layers"], int(cfg["n_routed_experts"])
    moe_intermediate = int(cfg["moe_intermediate_size"])
    routing = GroupedRouting(
        scoring="sigmoid", method="noaux_tc", n_group=int(cfg["n_group"] or 1), topk_group=int(cfg["topk_group"] or 1),
        routed_scaling_factor=float(cfg["routed_scaling_factor"]), norm_topk_prob=bool(cfg["norm_topk_prob"]),
    )
    first_dense = int(cfg["first_k_dense_replace"] or 0)
    return ModelArgs(
        **common,
        attention_bias=bool(cfg.get("attention_bias", False)),  # q/k/v only: o_proj has no bias
        qk_norm="head" if cfg["use_qk_norm"] else None,
        num_experts=n_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=moe_intermediate,
        norm_topk_prob=bool(cfg["norm_topk_prob"]),
        moe_layers=[i for i in range(n_layers) if n_experts and i >= first_dense],
        shared_expert_intermediate_size=moe_intermediate * int(cfg["n_shared_experts"] or 0),
        rotary_dim=rotary_dim_of(cfg, common["head_dim"]),
        routing=routing,
    )


def shape(args: ModelArgs, cfg: dict[str, Any], name: str) -> ModelShape:
    s = standard_shape(args, name, router_bias=True)  # e_score_correction_bias beside each router
    if cfg.get("num_nextn_predict_layers"):
        s.notes.append(f"{cfg['num_nextn_predict_layers']} multi-token-prediction layer(s) not counted (decode does not use them)")
    return s


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    """llama.cpp's glm4moe keys -> a Glm4MoeConfig (expert groups as the converter's base class writes them)."""
    a = "glm4moe"
    config = base_config(a, meta, shapes)
    config.update(moe_config(a, meta, shapes, "experts.0.gate_proj.weight"))
    n_main = int(need(meta, f"{a}.block_count")) - int(meta(f"{a}.nextn_predict_layers", 0) or 0)
    config.update(
        architectures=["Glm4MoeForCausalLM"], num_hidden_layers=n_main, n_routed_experts=config.pop("num_experts"),
        n_shared_experts=int(meta(f"{a}.expert_shared_count", 0) or 0),
        first_k_dense_replace=int(meta(f"{a}.leading_dense_block_count", 0) or 0),
        routed_scaling_factor=float(meta(f"{a}.expert_weights_scale", 1.0) or 1.0),
        norm_topk_prob=bool(meta(f"{a}.expert_weights_norm", False)),
        n_group=int(meta(f"{a}.expert_group_count", 1) or 1), topk_group=int(meta(f"{a}.expert_group_used_count", 1) or 1),
        use_qk_norm="model.layers.0.self_attn.q_norm.weight" in shapes,
        partial_rotary_factor=int(need(meta, f"{a}.rope.dimension_count")) / config["head_dim"],
    )
    return config


GGUF_BLOCK = MappingProxyType({
    **ATTN,
    "post_attention_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    **{k: f"mlp.{v}" for k, v in EXPERTS.items()},
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
})
GGUF = GGUFSpec("glm4moe", "glm4_moe", GGUF_BLOCK, gguf_config, ignored=("nextn.",))
ARCH = ArchSpec("glm4_moe", args_from_config, shared_name="shared_experts", shape=shape, gguf=GGUF)
