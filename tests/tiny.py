"""Tiny random HF checkpoints of every supported architecture, built with transformers."""
from __future__ import annotations

from pathlib import Path

import torch

V = 160  # vocab of every tiny model


def configs() -> dict[str, object]:
    """Several configs per architecture: GQA, unusual head dims, norm_topk_prob both ways."""
    from transformers import LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=V, num_hidden_layers=2, max_position_embeddings=256)
    return {
        "llama-gqa": LlamaConfig(**common, hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2),
        "llama-mha-tied": LlamaConfig(**common, hidden_size=40, intermediate_size=72, num_attention_heads=2,
                                      num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
        "qwen3_moe-norm": Qwen3MoeConfig(**common, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=True),
        "qwen3_moe-nonorm-dense1": Qwen3MoeConfig(**common, hidden_size=32, intermediate_size=64, moe_intermediate_size=20,
                                                  num_attention_heads=2, num_key_value_heads=1, head_dim=20, num_experts=6,
                                                  num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0]),
        "qwen2_moe": Qwen2MoeConfig(**common, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                                    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        "qwen2_moe-norm": Qwen2MoeConfig(**common, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=32, num_attention_heads=6, num_key_value_heads=3,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        "mixtral": MixtralConfig(**common, hidden_size=32, intermediate_size=24, num_attention_heads=4,
                                 num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2),
        "olmoe": OlmoeConfig(**common, hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=4,
                             num_experts=8, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1),
        "olmoe-gqa-norm": OlmoeConfig(**common, hidden_size=48, intermediate_size=24, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                      eos_token_id=2, pad_token_id=1),
    }


def make_checkpoint(config, directory: Path, seed: int = 0):
    """Random-weight HF model saved as safetensors; returns the model (eval mode, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger router weights so routing is not a near-tie everywhere
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model
