"""qwen2_moe: q/k/v biases and a shared expert scaled by sigmoid(x @ g); its GGUF (``qwen2moe``)."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, common_args, num_experts_of
from .gguf import GGUFSpec, Meta, Shapes, base_config, moe_block, moe_config
from .qwen3_moe import moe_layers
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    num_experts = num_experts_of(cfg)
    if cfg.get("use_sliding_window"):
        from ..errors import UnsupportedArchitecture

        raise UnsupportedArchitecture("qwen2_moe with use_sliding_window is not supported yet")
    return ModelArgs(
        **common_args(cfg, "qwen2_moe"),
        attention_bias=bool(cfg.get("qkv_bias", True)),
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe_layers(cfg, num_experts),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0)),
        shared_expert_gate=True,
    )


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    config = base_config("qwen2moe", meta, shapes)
    config.update(moe_config("qwen2moe", meta, shapes, "experts.0.gate_proj.weight"))
    shared = next((s for n, s in shapes.items() if n.endswith("shared_expert.gate_proj.weight")), None)
    config.update(architectures=["Qwen2MoeForCausalLM"], decoder_sparse_step=1, mlp_only_layers=[],
                  qkv_bias=config["attention_bias"], norm_topk_prob=bool(meta("qwen2moe.expert_weights_norm", False)),
                  shared_expert_intermediate_size=int(meta("qwen2moe.expert_shared_feed_forward_length", 0)
                                                      or (shared[0] if shared else 0)))
    return config


GGUF_BLOCK = moe_block({
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
})
GGUF = GGUFSpec("qwen2moe", "qwen2_moe", GGUF_BLOCK, gguf_config)
ARCH = ArchSpec("qwen2_moe", args_from_config, gguf=GGUF)
