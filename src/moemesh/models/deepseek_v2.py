"""deepseek_v2: multi-head latent attention, shared experts, grouped softmax routing.

Also the shared machinery of deepseek_v3 (DeepseekArgs, DeepseekBuilder), which differs only in
its router (layers/grouped_router.py) and in making interleaved RoPE optional.

Checkpoints written by transformers 5 name experts per expert (``mlp.experts.E.gate_proj``...),
as the original DeepSeek checkpoints do, so the shared per-expert naming applies. Layer i has an
MoE FFN when i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's rule;
transformers 5.23 ignores moe_layer_freq, which is 1 in every released config).

Both read from llama.cpp's ``deepseek2`` GGUF: models/deepseek_gguf.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitecture
from ..layers.grouped_router import GroupedRouting
from ..layers.mla import MLAConfig, MultiHeadLatentAttention
from ..layers.norm import RMSNorm
from .args import ModelArgs, common_args
from .build import Builder
from .deepseek_gguf import GGUF
from .shape import Linear, ModelShape, base_shape, gated
from .spec import ArchSpec

LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


@dataclass
class DeepseekArgs(ModelArgs):
    mla: MLAConfig | None = None

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
            # an int4/int8 trunk: the absorbed matrices int8 too (block-format trunks from GGUF keep them fp32)
            absorbed_int8=getattr(q_in, "mode", None) in ("int4", "int8"),
        )



def mla_shape(args: ModelArgs, cfg: dict[str, Any], name: str) -> ModelShape:
    """Multi-head latent attention; dense MLPs before the first MoE layer; shared experts."""
    assert isinstance(args, DeepseekArgs) and args.mla is not None and args.routing is not None
    m, d, h = args.mla, args.hidden_size, args.num_heads
    s = base_shape(args, name)
    bias = args.attention_bias
    attn = [Linear(m.kv_lora_rank + m.qk_rope_head_dim, d, bias), Linear(h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
            Linear(d, h * m.v_head_dim, bias)]
    small = 2 * d + m.kv_lora_rank
    if m.q_lora_rank:
        attn += [Linear(int(m.q_lora_rank), d, bias), Linear(h * (m.qk_nope_head_dim + m.qk_rope_head_dim), int(m.q_lora_rank))]
        small += int(m.q_lora_rank)
    else:
        attn.append(Linear(h * (m.qk_nope_head_dim + m.qk_rope_head_dim), d))
    s.expert_linears = gated(d, args.moe_intermediate_size)
    correction = args.num_experts if args.routing.scoring == "sigmoid" else 0  # e_score_correction_bias
    for i in range(args.num_layers):
        s.trunk_linears += attn
        if args.is_moe_layer(i):
            s.trunk_linears += gated(d, args.shared_expert_intermediate_size) if args.shared_expert_intermediate_size else []
            s.small_params += args.num_experts * d + correction  # router (+ correction bias)
        else:
            s.trunk_linears += gated(d, args.intermediate_size)
    s.small_params += args.num_layers * small + d
    if cfg.get("num_nextn_predict_layers"):
        s.notes.append(f"{cfg['num_nextn_predict_layers']} multi-token-prediction layer(s) not counted (decode does not use them)")
    return s


ARCH = ArchSpec("deepseek_v2", args_from_config, builder=DeepseekBuilder, shape=mla_shape, gguf=GGUF, shared_name="shared_experts")
