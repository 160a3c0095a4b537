"""DeepSeek-V2/V3 as llama.cpp's ``deepseek2`` GGUF (convert_hf_to_gguf.py's DeepseekV2Model).

MLA's kv_b_proj is stored split per head into ``attn_k_b`` [H, L, N] (transposed) and ``attn_v_b``
[H, V, L] and merged back here; the router's gating function says which model it is (softmax or
absent: V2, sigmoid: V3, whose ``exp_probs_b`` is the e_score_correction_bias). DeepSeek's RoPE
rotates adjacent pairs, llama.cpp's NORM rope, so q/k rows are not permuted. Multi-token-prediction
tensors (``nextn.*``) are skipped, as decoding does not use them.
"""
from __future__ import annotations

from types import MappingProxyType

import torch

from .gguf import EXPERTS, GGUFSpec, Merge, Meta, Shapes, base_config, need

GGUF_ARCH = "deepseek2"
SIGMOID = 2  # gguf.ExpertGatingFuncType.SIGMOID (1: softmax; absent in V2 GGUFs: softmax)


def gguf_config(meta: Meta, shapes: Shapes, v3: bool = False) -> dict:
    """llama.cpp's deepseek2 keys -> a DeepseekV2/V3 config (V3: sigmoid gating)."""
    a = GGUF_ARCH
    config = base_config(a, meta, shapes)
    rope = int(need(meta, f"{a}.rope.dimension_count"))
    k_mla = meta(f"{a}.attention.key_length_mla", None) or config["head_dim"]  # older GGUFs: per-head sizes
    v_mla = meta(f"{a}.attention.value_length_mla", None) or meta(f"{a}.attention.value_length", None)
    n_group = int(meta(f"{a}.expert_group_count", 1) or 1)
    config.update(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        num_key_value_heads=config["num_attention_heads"], q_lora_rank=meta(f"{a}.attention.q_lora_rank", None),
        kv_lora_rank=int(need(meta, f"{a}.attention.kv_lora_rank")), qk_rope_head_dim=rope,
        qk_nope_head_dim=int(k_mla) - rope, v_head_dim=int(v_mla),
        n_routed_experts=int(meta(f"{a}.expert_count", 0) or 0), num_experts_per_tok=int(meta(f"{a}.expert_used_count", 0)),
        n_shared_experts=int(meta(f"{a}.expert_shared_count", 0) or 0),
        moe_intermediate_size=int(meta(f"{a}.expert_feed_forward_length", 0) or 0),
        first_k_dense_replace=int(meta(f"{a}.leading_dense_block_count", 0) or 0), moe_layer_freq=1,
        routed_scaling_factor=float(meta(f"{a}.expert_weights_scale", 1.0) or 1.0),
        norm_topk_prob=bool(meta(f"{a}.expert_weights_norm", False)), n_group=n_group,
        topk_group=int(meta(f"{a}.expert_group_used_count", 1) or 1), rope_interleave=True,
        topk_method="noaux_tc" if v3 else ("group_limited_greedy" if n_group > 1 else "greedy"),
    )
    del config["head_dim"]
    if meta(f"{a}.rope.scaling.type", None) == "yarn":
        rs = {"rope_type": "yarn", "factor": float(need(meta, f"{a}.rope.scaling.factor")),
              "original_max_position_embeddings": int(need(meta, f"{a}.rope.scaling.original_context_length")),
              "beta_fast": float(meta(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
              "beta_slow": float(meta(f"{a}.rope.scaling.yarn_beta_slow", 1.0))}
        if (log_mul := meta(f"{a}.rope.scaling.yarn_log_multiplier", None)) is not None:
            # the converter writes 0.1 * mscale_all_dim; llama.cpp takes mscale == mscale_all_dim (true of every release)
            rs["mscale"] = rs["mscale_all_dim"] = float(log_mul) / 0.1
        config["rope_scaling"] = rs
    return config


def merge_kv_b(parts: list[torch.Tensor], config: dict) -> torch.Tensor:
    """attn_k_b [H, L, N] + attn_v_b [H, V, L] -> kv_b_proj [H (N + V), L] (the converter's split undone)."""
    k_b, v_b = parts
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])


GGUF_BLOCK = MappingProxyType({
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    **{k: f"mlp.{v}" for k, v in EXPERTS.items()},
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
})
GGUF_MERGES = MappingProxyType({"self_attn.kv_b_proj.weight": Merge(
    ("attn_k_b.weight", "attn_v_b.weight"), merge_kv_b, lambda s: (s[0][0] * (s[0][2] + s[1][1]), s[0][1]))})
GGUF = GGUFSpec(GGUF_ARCH, "deepseek_v2", GGUF_BLOCK, gguf_config, merges=GGUF_MERGES, ignored=("nextn.",),
                matches=lambda meta: meta(f"{GGUF_ARCH}.expert_gating_func", 1) != SIGMOID)
