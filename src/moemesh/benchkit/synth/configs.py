"""The HF configs of the synthetic benchmark models (benchkit/synth/models.py): each real model's
per-layer shapes with a configurable depth and vocabulary, and the llama.cpp architecture its GGUF
is written as."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import core as synth


@dataclass(frozen=True)
class SynthModel:
    key: str  # the --model name
    model_type: str
    layers: int  # default depth
    vocab: int  # default vocabulary
    config: Callable[[int, int], dict]  # (layers, vocab) -> HF config dict
    gguf_arch: str | None  # None: no GGUF for llama.cpp


def _mixtral(layers: int, vocab: int) -> dict:
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": layers, "vocab_size": vocab,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": None,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16"}


def _gpt_oss(layers: int, vocab: int) -> dict:
    return {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": 2880,
            "intermediate_size": 2880, "num_local_experts": 128, "num_experts_per_tok": 4, "experts_per_token": 4,
            "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": layers,
            "vocab_size": vocab, "attention_bias": True, "sliding_window": 128,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            "rms_norm_eps": 1e-5, "rope_theta": 150000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096},
            "swiglu_limit": 7.0, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "bfloat16"}


def _deepseek_v3(layers: int, vocab: int) -> dict:
    return {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
            "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
            "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
            "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "first_k_dense_replace": 0,
            "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
            "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
            "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 0,
            "eos_token_id": 1, "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16"}


MODELS = {m.key: m for m in (
    SynthModel("qwen3-30b-a3b", "qwen3_moe", 12, 32768, synth.hf_config, "qwen3moe"),
    SynthModel("mixtral-8x7b", "mixtral", 7, 32000, _mixtral, "llama"),
    SynthModel("gpt-oss-120b", "gpt_oss", 2, 32768, _gpt_oss, "gpt-oss"),
    SynthModel("deepseek-v3", "deepseek_v3", 1, 32768, _deepseek_v3, "deepseek2"),
)}


TITLES = {"qwen3-30b-a3b": "Qwen3-30B-A3B", "mixtral-8x7b": "Mixtral-8x7B", "gpt-oss-120b": "gpt-oss-120b",
          "deepseek-v3": "DeepSeek-V3"}  # as the model cards spell them
