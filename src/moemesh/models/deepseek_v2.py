"""deepseek_v2: multi-head latent attention, shared experts, grouped softmax routing.

Also the shared machinery of deepseek_v3 (DeepseekArgs, DeepseekBuilder), which differs only in
its router (layers/grouped_router.py) and in making interleaved RoPE optional.

Checkpoints written by transformers 5 name experts per expert (``mlp.experts.E.gate_proj``...),
as the original DeepSeek checkpoints do, so the shared per-expert naming applies. Layer i has an
MoE FFN when i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's rule;
transformers 5.23 ignores moe_layer_freq, which is 1 in every released config).

Both read from llama.cpp's ``deepseek2`` GGUF (``gguf_config``, ``GGUF_BLOCK``): MLA's kv_b_proj is
stored split per head into ``attn_k_b`` [H, L, N] (transposed) and ``attn_v_b`` [H, V, L] and merged
back here; the router's gating function says which (softmax: V2, sigmoid: V3). DeepSeek's RoPE
rotates adjacent pairs, llama.cpp's NORM rope, so q/k rows are not permuted.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..errors import UnsupportedArchitecture
from ..layers.grouped_router import GroupedRouter, GroupedRouting
from ..layers.mla import MLAConfig, MultiHeadLatentAttention
from ..layers.moe import ExpertProvider, MoEBlock
from ..layers.norm import RMSNorm
from .args import ModelArgs, common_args
from .build import Builder
from .gguf import EXPERTS, GGUFSpec, Merge, Meta, Shapes, base_config, need
from .spec import ArchSpec

LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


@dataclass
class DeepseekArgs(ModelArgs):
    mla: MLAConfig | None = None
    routing: GroupedRouting | None = None

    def cache_layout(self) -> dict[str, Any]:
        assert self.mla is not None
        return dict(num_kv_heads=1, head_dim=self.mla.latent_dim, value_dim=self.mla.kv_lora_rank, values_in_keys=True)


def mla_config(cfg: dict[str, Any], rope_scaling: dict | None, interleaved: bool) -> MLAConfig:
    rs = rope_scaling or {}
    return MLAConfig(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
        v_head_dim=int(cfg["v_head_dim"]),
        interleaved_rope=interleaved,
        mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
        rope_factor=float(rs.get("factor") or 1.0),
    )


def deepseek_args(cfg: dict[str, Any], model_type: str, routing: GroupedRouting, interleaved: bool) -> DeepseekArgs:
    if cfg.get("mlp_bias"):
        raise UnsupportedArchitecture(f"{model_type} with mlp_bias is not supported")
    common = common_args(cfg, model_type)
    n_layers = common["num_layers"]
    n_experts = cfg.get("n_routed_experts", cfg.get("num_experts", cfg.get("num_local_experts")))
    n_experts = int(n_experts or 0)
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    moe_intermediate = int(cfg.get("moe_intermediate_size") or 0)
    mla = mla_config(cfg, common["rope_scaling"], interleaved)
    common.update(head_dim=mla.qk_rope_head_dim)  # the shared RoPE tables cover the rope part only
    return DeepseekArgs(
        **common,
        attention_bias=bool(cfg.get("attention_bias", False)),
        num_experts=n_experts,
        top_k=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=moe_intermediate,
        moe_layers=[i for i in range(n_layers) if n_experts and i >= first_dense and i % freq == 0],
        shared_expert_intermediate_size=moe_intermediate * int(cfg.get("n_shared_experts") or 0),
        mla=mla,
        routing=routing,
    )


# transformers' DeepseekV2Config defaults, for keys a config.json leaves out
DEFAULTS = dict(n_shared_experts=2, first_k_dense_replace=0, routed_scaling_factor=1.0, topk_method="greedy")


def args_from_config(cfg: dict[str, Any]) -> DeepseekArgs:
    cfg = {**DEFAULTS, **cfg}
    method = cfg.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedArchitecture(f"deepseek_v2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    routing = GroupedRouting(
        scoring="softmax",
        method=method,
        n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=False,  # transformers' V2 router does not renormalise (see grouped_router.py)
    )
    return deepseek_args(cfg, "deepseek_v2", routing, interleaved=True)


class DeepseekBuilder(Builder):
    args: DeepseekArgs

    def attention(self, i: int) -> MultiHeadLatentAttention:
        a, s, m = self.args, self.spec, self.args.mla
        assert m is not None

        def bias(name: str) -> list[str] | None:
            return [s.attn(i, f"{name}.bias")] if a.attention_bias else None

        q_norm = q_b = None
        if m.q_lora_rank is None:
            q_in = self.linear([s.attn(i, "q_proj.weight")])
        else:
            q_in = self.linear([s.attn(i, "q_a_proj.weight")], bias("q_a_proj"))
            q_norm = RMSNorm(self.tensor(s.attn(i, "q_a_layernorm.weight")), LORA_NORM_EPS)
            q_b = self.linear([s.attn(i, "q_b_proj.weight")])
        return MultiHeadLatentAttention(
            i, m, a.num_heads, q_in, q_norm, q_b,
            self.linear([s.attn(i, "kv_a_proj_with_mqa.weight")], bias("kv_a_proj_with_mqa")),
            RMSNorm(self.tensor(s.attn(i, "kv_a_layernorm.weight")), LORA_NORM_EPS),
            self.tensor(s.attn(i, "kv_b_proj.weight")).float(),  # absorbed into q and the output
            self.linear([s.attn(i, "o_proj.weight")], bias("o_proj")),
        )

    def moe(self, i: int, provider: ExpertProvider) -> MoEBlock:
        a, s = self.args, self.spec
        assert a.routing is not None
        bias = self.optional(s.moe(i, "gate.e_score_correction_bias")) if a.routing.scoring == "sigmoid" else None
        router = GroupedRouter(self.tensor(s.moe(i, "gate.weight")), a.top_k, a.routing, bias)
        shared = None
        if a.shared_expert_intermediate_size:
            shared = self.gated_mlp(*(s.moe(i, f"shared_experts.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")))
        return MoEBlock(i, router, provider, shared)  # type: ignore[arg-type]  # same call as TopKRouter


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
ARCH = ArchSpec("deepseek_v2", args_from_config, builder=DeepseekBuilder, gguf=GGUF)
