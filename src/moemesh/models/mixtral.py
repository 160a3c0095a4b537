"""mixtral: every layer sparse, top-k renormalised, experts named w1 (gate), w3 (up), w2 (down).
Its GGUF is llama.cpp's ``llama`` with ``llama.expert_count`` (q/k rows permuted as llama's)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .args import ModelArgs, common_args, num_experts_of
from .gguf import ATTN, GGUFSpec, Meta, Shapes, llama_row_permutation
from .llama import gguf_config as llama_gguf_config
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    num_experts = num_experts_of(cfg)
    return ModelArgs(
        **common_args(cfg, "mixtral"),
        sliding_window=cfg.get("sliding_window"),
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=True,
        moe_layers=list(range(int(cfg["num_hidden_layers"]))),
    )


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    config = llama_gguf_config(meta, shapes)
    w1 = next((s for n, s in shapes.items() if n.endswith("experts.0.w1.weight")), None)
    config.update(architectures=["MixtralForCausalLM"], num_local_experts=int(meta("llama.expert_count", 0)),
                  num_experts_per_tok=int(meta("llama.expert_used_count", 2)),
                  intermediate_size=int(w1[0]) if w1 else config["intermediate_size"])
    return config


GGUF_BLOCK = MappingProxyType({
    **ATTN,
    "ffn_gate_inp": "block_sparse_moe.gate",
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
})
GGUF = GGUFSpec("llama", "mixtral", GGUF_BLOCK, gguf_config, matches=lambda meta: bool(meta("llama.expert_count", 0)),
                row_permutation=llama_row_permutation)
ARCH = ArchSpec("mixtral", args_from_config, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"), gguf=GGUF)
