"""llama: the dense baseline (SmolLM2, Llama 2/3 without RoPE scaling); its GGUF (``llama``)."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, common_args
from .gguf import ATTN, GGUFSpec, Meta, Shapes, base_config, llama_row_permutation
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(**common_args(cfg, "llama"), attention_bias=bias, o_bias=bias)


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    """llama.cpp's ``llama`` keys (also Mixtral's, which llama.cpp writes as a llama with experts)."""
    config = base_config("llama", meta, shapes)
    config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in shapes
    scaling = meta("llama.rope.scaling.type", None)
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(meta("llama.rope.scaling.factor", 1.0))}
        if (orig := meta("llama.rope.scaling.original_context_length", None)) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    config["architectures"] = ["LlamaForCausalLM"]
    return config


GGUF = GGUFSpec("llama", "llama", ATTN, gguf_config, matches=lambda meta: not meta("llama.expert_count", 0),
                row_permutation=llama_row_permutation)
ARCH = ArchSpec("llama", args_from_config, gguf=GGUF)
