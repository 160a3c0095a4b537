"""Well-known MoE models as their HF ``config.json`` values (only the keys that size a model).

Written from the published config.json files of each repository; ``moemesh plan NAME`` runs them
through the same counting as a real config.json, and tests/test_plan.py checks the totals against
the parameter counts the model cards publish.
"""
from __future__ import annotations

from typing import Any

_QWEN3 = dict(model_type="qwen3_moe", vocab_size=151936, head_dim=128,
              tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], num_experts=128,
              num_experts_per_tok=8, attention_bias=False, norm_topk_prob=True)
_GPT_OSS = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64,
                num_attention_heads=64, num_key_value_heads=8, num_experts_per_tok=4, attention_bias=True,
                tie_word_embeddings=False, sliding_window=128)

KNOWN: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B
    "Qwen3-30B-A3B": {**_QWEN3, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "intermediate_size": 6144, "moe_intermediate_size": 768},
    # Qwen/Qwen3-235B-A22B
    "Qwen3-235B-A22B": {**_QWEN3, "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
                        "num_key_value_heads": 4, "intermediate_size": 12288, "moe_intermediate_size": 1536},
    # openai/gpt-oss-20b, openai/gpt-oss-120b (the checkpoints store experts as MXFP4)
    "gpt-oss-20b": {**_GPT_OSS, "num_hidden_layers": 24, "num_local_experts": 32},
    "gpt-oss-120b": {**_GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128},
    # mistralai/Mixtral-8x7B-v0.1
    "Mixtral-8x7B": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, tie_word_embeddings=False),
    # deepseek-ai/DeepSeek-V3 (its multi-token-prediction layer, num_nextn_predict_layers=1, is not counted)
    "DeepSeek-V3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
                        first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="noaux_tc",
                        n_group=8, topk_group=4, num_nextn_predict_layers=1, tie_word_embeddings=False,
                        attention_bias=False),
    # Qwen/Qwen3.5-397B-A17B (text model; its model card: 60 layers laid out 15 x (3 Gated DeltaNet + 1 gated
    # attention), DeltaNet 64 V / 16 QK heads of 128, attention 32 Q / 2 KV heads of 256 with 64 rotary dims,
    # 512 experts of 1024, 10 routed + 1 shared, vocabulary 248320)
    "Qwen3.5-397B-A17B": dict(model_type="qwen3_5_moe", tie_word_embeddings=False, text_config=dict(
        vocab_size=248320, hidden_size=4096, num_hidden_layers=60, full_attention_interval=4, num_attention_heads=32,
        num_key_value_heads=2, head_dim=256, rope_parameters=dict(rope_type="default", rope_theta=10000000.0,
                                                                  partial_rotary_factor=0.25),
        linear_num_key_heads=16, linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024)),
    # zai-org/GLM-4.6 (GLM-4.5's architecture; its multi-token-prediction layer is not counted)
    "GLM-4.6": dict(model_type="glm4_moe", vocab_size=151552, hidden_size=5120, intermediate_size=12288,
                    moe_intermediate_size=1536, num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8,
                    head_dim=128, n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
                    first_k_dense_replace=3, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                    n_group=1, topk_group=1, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                    tie_word_embeddings=False),
    # MiniMaxAI/MiniMax-M2
    "MiniMax-M2": dict(model_type="minimax_m2", vocab_size=200064, hidden_size=3072, intermediate_size=1536,
                       num_hidden_layers=62, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
                       rotary_dim=64, num_local_experts=256, num_experts_per_tok=8, tie_word_embeddings=False),
    # moonshotai/Kimi-K2.5: Kimi K2's DeepSeek-V3-shaped text model (384 experts, one dense layer) beside a
    # vision tower that is not counted
    "Kimi-K2.5": dict(model_type="kimi_k25", tie_word_embeddings=False, text_config=dict(
        model_type="kimi_k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1,
        n_routed_experts=384, num_experts_per_tok=8, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, num_nextn_predict_layers=0, tie_word_embeddings=False)),
    # zai-org/GLM-5 (glm_moe_dsa: MLA + DeepSeek sparse attention's indexer in every layer; the sizes
    # transformers' GlmMoeDsaConfig defaults to)
    "GLM-5": dict(model_type="glm_moe_dsa", vocab_size=154880, hidden_size=6144, intermediate_size=12288,
                  moe_intermediate_size=2048, num_hidden_layers=78, num_attention_heads=64, num_key_value_heads=64,
                  n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3,
                  q_lora_rank=2048, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
                  n_group=1, topk_group=1, routed_scaling_factor=2.5, index_topk=2048, index_head_dim=128,
                  index_n_heads=32, num_nextn_predict_layers=1, tie_word_embeddings=False),
}

# The formats the published files hold the routed experts in (moemesh plan adds a row for each): the
# official gpt-oss checkpoints' MXFP4, DeepSeek-V3's FP8 (e4m3, 128x128 block scales), and the GGUF
# types llama.cpp users most often pick for the others.
NATIVE_FORMATS = {"gpt-oss-20b": ["MXFP4"], "gpt-oss-120b": ["MXFP4"], "DeepSeek-V3": ["FP8"],
                  "Qwen3-30B-A3B": ["Q4_K", "Q8_0"], "Qwen3-235B-A22B": ["Q4_K", "Q2_K"], "Mixtral-8x7B": ["Q4_K"]}

# The parameter counts the model cards publish (billions), for the tests and the docs. Sources: each
# repository's model card; Kimi: the Kimi K2 technical report's 1.04 trillion total / 32B activated, which
# K2.5's text model keeps; GLM-4.6: the GLM-4.5 card's 355B / 32B (same architecture); MiniMax-M2: "230
# billion total parameters with 10 billion active"; GLM-5: "744B parameters (40B active)".
PUBLISHED = {
    "Qwen3-30B-A3B": (30.5, 3.3), "Qwen3-235B-A22B": (235.0, 22.0), "gpt-oss-20b": (20.9, 3.6),
    "gpt-oss-120b": (116.8, 5.1), "Mixtral-8x7B": (46.7, 12.9), "DeepSeek-V3": (671.0, 37.0),
    "Qwen3.5-397B-A17B": (397.0, 17.0), "GLM-4.6": (355.0, 32.0), "MiniMax-M2": (230.0, 10.0),
    "Kimi-K2.5": (1040.0, 32.0), "GLM-5": (744.0, 40.0),
}


def lookup(name: str) -> tuple[str, dict[str, Any]] | None:
    """Case-insensitive match on the name, with or without an ``org/`` prefix."""
    want = name.rsplit("/", 1)[-1].lower()
    for key, cfg in KNOWN.items():
        if key.lower() == want:
            return key, dict(cfg)
    return None
