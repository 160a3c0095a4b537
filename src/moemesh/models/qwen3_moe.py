"""qwen3_moe: per-head q/k RMSNorm, softmax-then-top-k router with ``norm_topk_prob``; its GGUF (``qwen3moe``)."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, num_experts_of, routed_args
from .gguf import QK_NORMS, GGUFSpec, Meta, Shapes, base_config, moe_block, moe_config
from .spec import ArchSpec


def moe_layers(cfg: dict[str, Any], num_experts: int) -> list[int]:
    """Qwen MoE: layer i is sparse unless listed in mlp_only_layers or off the sparse step."""
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(int(cfg["num_hidden_layers"])) if num_experts > 0 and i not in dense and (i + 1) % step == 0]


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    layers = moe_layers(cfg, num_experts_of(cfg))
    return ModelArgs(**routed_args(cfg, "qwen3_moe", layers, "moe_intermediate_size", True), qk_norm="head",
                     sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None)


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    config = base_config("qwen3moe", meta, shapes)
    config.update(moe_config("qwen3moe", meta, shapes, "experts.0.gate_proj.weight"))
    config.update(architectures=["Qwen3MoeForCausalLM"], decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=bool(meta("qwen3moe.expert_weights_norm", True)))  # llama.cpp normalizes for qwen3moe
    return config


GGUF_BLOCK = moe_block(QK_NORMS)
# llama.cpp's converter keeps HF's rotary row order for qwen3moe (NEOX rope): no permutation
GGUF = GGUFSpec("qwen3moe", "qwen3_moe", GGUF_BLOCK, gguf_config)
ARCH = ArchSpec("qwen3_moe", args_from_config, gguf=GGUF)
