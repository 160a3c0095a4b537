"""Qwen3-Next as llama.cpp's ``qwen3next`` GGUF (conversion/qwen.py Qwen3NextModel over Qwen2MoeModel).

What the converter changes, undone here: in_proj_qkvz (per key head [q, k, v, z]) is written as
``attn_qkv`` (every head's q, then k, then v) + ``attn_gate`` (z), merged back; every (1 + w)
RMSNorm outside the DeltaNet is stored as w + 1 (1 subtracted at load); ``A_log`` is stored as
``ssm_a`` = -exp(A_log) (log(-a) at load, exact to fp32 rounding); the conv weight loses its
middle axis; ``dt_bias`` is ``ssm_dt.bias``. Layer kinds come from
``attention.recurrent_layers`` (else ``full_attention_interval``); MoE-less layers from the
tensors. The MTP block (``nextn.*``) is skipped. q/k rows keep HF's order (NEOX rope).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from types import MappingProxyType

import torch

from .gguf import ATTN, EXPERTS, GGUFSpec, Merge, Meta, Shapes, base_config, moe_config, need

GGUF_ARCH = "qwen3next"
_PLUS_ONE = re.compile(r"model\.norm\.weight|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|"
                       r"self_attn\.q_norm|self_attn\.k_norm)\.weight")


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    a = GGUF_ARCH
    config = base_config(a, meta, shapes)
    config.update(moe_config(a, meta, shapes, "experts.0.gate_proj.weight"))
    n = config["num_hidden_layers"] - int(meta(f"{a}.nextn_predict_layers", 0) or 0)
    recurrent = meta(f"{a}.attention.recurrent_layers", None)
    if recurrent is not None:
        types = ["linear_attention" if r else "full_attention" for r in list(recurrent)[:n]]
    else:
        every = int(meta(f"{a}.full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    v_heads = int(need(meta, f"{a}.ssm.time_step_rank"))
    config.update(
        architectures=["Qwen3NextForCausalLM"], num_hidden_layers=n, layer_types=types, decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(n) if f"model.layers.{i}.mlp.experts.0.gate_proj.weight" not in shapes],
        norm_topk_prob=bool(meta(f"{a}.expert_weights_norm", True)),
        shared_expert_intermediate_size=int(meta(f"{a}.expert_shared_feed_forward_length", 0) or 0),
        linear_conv_kernel_dim=int(need(meta, f"{a}.ssm.conv_kernel")),
        linear_key_head_dim=int(need(meta, f"{a}.ssm.state_size")),
        linear_num_key_heads=int(need(meta, f"{a}.ssm.group_count")), linear_num_value_heads=v_heads,
        linear_value_head_dim=int(need(meta, f"{a}.ssm.inner_size")) // v_heads,
        partial_rotary_factor=int(need(meta, f"{a}.rope.dimension_count")) / config["head_dim"],
    )
    return config


def merge_qkvz(parts: list[torch.Tensor], config: dict) -> torch.Tensor:
    """attn_qkv [Hk K + Hk K + Hv Dv, D] + attn_gate [Hv Dv, D] -> in_proj_qkvz [Hk (2K + 2 r Dv), D]."""
    qkv, z = parts
    hk, k = config["linear_num_key_heads"], config["linear_key_head_dim"]
    rv = config["linear_num_value_heads"] // hk * config["linear_value_head_dim"]
    q, kk, v = qkv.split([hk * k, hk * k, hk * rv], dim=0)
    d = qkv.shape[1]
    heads = [q.view(hk, k, d), kk.view(hk, k, d), v.view(hk, rv, d), z.view(hk, rv, d)]
    return torch.cat(heads, dim=1).reshape(-1, d)


def value_fix(hf_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if _PLUS_ONE.fullmatch(hf_name):
        return lambda t: t - 1.0  # the converter stored w + 1 for these (1 + w) norms
    if hf_name.endswith(".linear_attn.A_log"):
        return lambda t: torch.log(-t)  # stored -exp(A_log)
    return None


GGUF_BLOCK = MappingProxyType({
    **ATTN,
    "post_attention_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate", **{k: f"mlp.{v}" for k, v in EXPERTS.items()},
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ssm_ba": "linear_attn.in_proj_ba", "ssm_norm": "linear_attn.norm", "ssm_out": "linear_attn.out_proj",
    "ssm_dt.bias": "linear_attn.dt_bias", "ssm_a": "linear_attn.A_log",
})
GGUF_MERGES = MappingProxyType({
    "linear_attn.in_proj_qkvz.weight": Merge(("attn_qkv.weight", "attn_gate.weight"), merge_qkvz,
                                             lambda s: (s[0][0] + s[1][0], s[0][1])),
    "linear_attn.conv1d.weight": Merge(("ssm_conv1d.weight",), lambda p, c: p[0].unsqueeze(1),  # [C, K] -> [C, 1, K]
                                       lambda s: (s[0][0], 1, s[0][1])),
})
GGUF = GGUFSpec(GGUF_ARCH, "qwen3_next", GGUF_BLOCK, gguf_config, merges=GGUF_MERGES, ignored=("nextn.",),
                value_fix=value_fix)
