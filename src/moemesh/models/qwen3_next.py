"""qwen3_next (Qwen3-Next): a hybrid stack. Three of every four layers (``layer_types``) are
Gated DeltaNet linear attention (layers/gated_deltanet.py: a recurrent state per sequence, no
KV cache); the others are gated full attention (q_proj yields [q | gate] per head, the output is
scaled by sigmoid(gate); per-head q/k norms; partial rotary). Every RMSNorm outside the DeltaNet
scales by (1 + weight) (zero-centred weights): the builder folds the 1 in at load. MoE layers
are Qwen2-MoE's: softmax top-k router, a shared expert gated by sigmoid(x @ g).

Qwen3-Next's in_proj_qkvz / in_proj_ba interleave q, k, v, z (and b, a) per key head; the layer
gathers the projection's outputs into [q; k; v; z; b; a] (``in_perm``) so the linear itself is
an ordinary (quantizable) QuantLinear. Qwen3.5 (models/qwen3_5_moe.py) stores them apart.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.gated_deltanet import DeltaNetConfig, GatedDeltaNet
from ..layers.norm import RMSNorm
from ..quant.qlinear import QuantLinear
from .args import ModelArgs, common_args, num_experts_of, rotary_dim_of
from .build import Builder
from .qwen3_moe import moe_layers
from .qwen3_next_gguf import GGUF
from .shape import Linear, ModelShape, base_shape, gated
from .spec import ArchSpec

LINEAR, FULL = "linear_attention", "full_attention"


def hybrid_layer_types(cfg: dict[str, Any], n: int) -> list[str]:
    types = cfg.get("layer_types") or [FULL if (i + 1) % int(cfg.get("full_attention_interval", 4)) == 0 else LINEAR
                                       for i in range(n)]
    if len(types) != n or not set(types) <= {LINEAR, FULL}:
        raise CheckpointError(f"bad layer_types {types!r} for {n} layers")
    return list(types)


def hybrid_args(cfg: dict[str, Any], model_type: str, moe: list[int]) -> ModelArgs:
    """ModelArgs of a Qwen3-Next-style hybrid text config (shared by qwen3_5_moe)."""
    common = common_args(cfg, model_type)
    n = common["num_layers"]
    linear = DeltaNetConfig(
        num_k_heads=int(cfg["linear_num_key_heads"]), num_v_heads=int(cfg["linear_num_value_heads"]),
        k_dim=int(cfg["linear_key_head_dim"]), v_dim=int(cfg["linear_value_head_dim"]),
        conv_kernel=int(cfg.get("linear_conv_kernel_dim", 4)), norm_eps=common["rms_norm_eps"],
    )
    if linear.num_v_heads % linear.num_k_heads:
        raise CheckpointError(f"{model_type}: linear_num_value_heads must be a multiple of linear_num_key_heads")
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        **common,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="head",
        attn_output_gate=True,
        layer_types=hybrid_layer_types(cfg, n),
        rotary_dim=rotary_dim_of({"partial_rotary_factor": 0.25, **cfg}, common["head_dim"]),
        num_experts=num_experts_of(cfg),
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=moe,
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0)),
        shared_expert_gate=True,
        linear_attn=linear,
    )


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    return hybrid_args(cfg, "qwen3_next", moe_layers(cfg, num_experts_of(cfg)))


def interleaved_order(c: DeltaNetConfig) -> torch.Tensor:
    """Qwen3-Next's projection outputs [per key head: q K, k K, v rDv, z rDv] + [per key head: b r, a r]
    (r = Hv / Hk) -> the index of each output in [q; k; v; z; b; a] order."""
    r = c.num_v_heads // c.num_k_heads
    group = 2 * c.k_dim + 2 * r * c.v_dim
    idx = torch.arange(c.num_k_heads * group).view(c.num_k_heads, group)
    q, k, v, z = idx.split([c.k_dim, c.k_dim, r * c.v_dim, r * c.v_dim], dim=1)
    ba = torch.arange(2 * c.num_v_heads).view(c.num_k_heads, 2 * r) + idx.numel()
    b, a = ba.split([r, r], dim=1)
    return torch.cat([t.reshape(-1) for t in (q, k, v, z, b, a)])


class HybridBuilder(Builder):
    """Qwen3-Next: (1 + w) norms, DeltaNet layers where layer_types say so."""

    def norm(self, name: str) -> RMSNorm:
        return RMSNorm(self.tensor(name).float() + 1.0, self.args.rms_norm_eps)

    def attention(self, i: int) -> Any:
        if not self.args.is_linear_layer(i):
            return super().attention(i)
        c = self.args.linear_attn
        assert c is not None
        p = f"model.layers.{i}.linear_attn."
        in_proj, perm = self.deltanet_in_proj(p, c)
        return GatedDeltaNet(self.args.cache_index(i), c, in_proj, self.tensor(p + "conv1d.weight"),
                             self.tensor(p + "A_log"), self.tensor(p + "dt_bias"), self.tensor(p + "norm.weight"),
                             self.linear([p + "out_proj.weight"]), in_perm=perm)

    def deltanet_in_proj(self, p: str, c: DeltaNetConfig) -> tuple[QuantLinear, torch.Tensor | None]:
        """The fused input projection and the gather putting its outputs in [q; k; v; z; b; a] order."""
        return self.linear([p + "in_proj_qkvz.weight", p + "in_proj_ba.weight"]), interleaved_order(c)


def hybrid_shape(args: ModelArgs, cfg: dict[str, Any], name: str) -> ModelShape:
    """DeltaNet layers (fused input projection, out_proj; conv, decay and norm weights small) and
    gated attention layers (q_proj twice as wide: [q | gate]); dense or MoE FFNs with a gated shared expert."""
    c, d, h, kv, hd = args.linear_attn, args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim
    assert c is not None
    s = base_shape(args, name)
    s.expert_linears = gated(d, args.moe_intermediate_size)
    for i in range(args.num_layers):
        if args.is_linear_layer(i):
            s.trunk_linears += [Linear(c.conv_dim + c.value_dim + 2 * c.num_v_heads, d), Linear(d, c.value_dim)]
            s.small_params += c.conv_dim * c.conv_kernel + 2 * c.num_v_heads + c.v_dim  # conv, A_log + dt_bias, norm
        else:
            s.trunk_linears += [Linear((2 * h + 2 * kv) * hd, d, args.attention_bias), Linear(d, h * hd, args.o_bias)]
            s.small_params += 2 * hd  # q/k norms
        if args.is_moe_layer(i):
            s.trunk_linears += gated(d, args.shared_expert_intermediate_size) if args.shared_expert_intermediate_size else []
            s.small_params += args.num_experts * d + d  # router + shared_expert_gate
        else:
            s.trunk_linears += gated(d, args.intermediate_size)
    s.small_params += args.num_layers * 2 * d + d  # layer norms + final norm
    s.notes.append("text model only (a vision tower is not counted); multi-token-prediction layers not counted")
    return s


ARCH = ArchSpec("qwen3_next", args_from_config, builder=HybridBuilder, shape=hybrid_shape, gguf=GGUF)
