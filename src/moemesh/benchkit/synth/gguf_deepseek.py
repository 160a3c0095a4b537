"""The GGUF side of benchkit/synth/models.py for DeepSeek-V3: llama.cpp's ``deepseek2`` architecture,
written as convert_hf_to_gguf.py's DeepseekV2Model writes a real DeepSeek-V3 checkpoint.

* MLA with weight absorption: ``kv_b_proj`` [H (N + V), L] is split per head into
  ``attn_k_b`` (the key rows, transposed: torch [H, L, N]) and ``attn_v_b`` (torch [H, V, L]);
  the KV "head" is the latent, so head_count_kv 1, key_length L + R, value_length L, and the
  per-head sizes go to key_length_mla N + R / value_length_mla V. k_b/v_b are F32: moemesh keeps
  kv_b unquantized too (it is absorbed into q and the output).
* No q/k permutation: DeepSeek's RoPE rotates adjacent pairs, which is llama.cpp's NORM RoPE and
  moemesh's ``apply_rope_pairs`` alike (transformers' V3 de-interleaves; every dot product agrees).
* YaRN: type, factor, original context, beta_fast/slow as written by the converter's base class;
  ``rope.scaling.yarn_log_multiplier`` = 0.1 * mscale_all_dim ("for legacy reasons", see the
  converter's TAG_DEEPSEEK2_YARN_LOG_MUL_FIX): llama.cpp then folds mscale^2 into the softmax
  scale, as transformers (and moemesh's MLAConfig.softmax_scale) do.
* Router: F32 ``ffn_gate_inp`` and ``exp_probs_b.bias`` (e_score_correction_bias), sigmoid
  gating, expert_weights_norm, expert_weights_scale = routed_scaling_factor, group-limited
  selection (expert_group_count / expert_group_used_count), one shared expert (``*_shexp``).

Trunk matrices are Q4_0 of the store's bf16 values (``float_trunk``: F32, for a parity check
that isolates the experts); norms, router and bias F32; experts stacked Q4_0, bit-identical to
the store's blobs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import core as synth

ATTN = {"q_a_proj.weight": "attn_q_a.weight", "q_a_layernorm.weight": "attn_q_a_norm.weight",
        "q_b_proj.weight": "attn_q_b.weight", "kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
        "kv_a_layernorm.weight": "attn_kv_a_norm.weight", "o_proj.weight": "attn_output.weight"}
LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
         **{f"self_attn.{k}": v for k, v in ATTN.items()},
         **{f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")}}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
Q4 = {"token_embd", "output", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_output",
      "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"}


def gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{LAYER[rest]}"


def split_kv_b(w: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """kv_b [H (N + V), L] -> (k_b [H, L, N], v_b [H, V, L]), as the converter splits it."""
    h, n, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    kv = w.reshape(h, n + v, w.shape[-1])
    return np.ascontiguousarray(kv[:, :n].transpose(0, 2, 1)), np.ascontiguousarray(kv[:, n:])


def trunk_arrays(hf: str, t: torch.Tensor, cfg: dict, float_trunk: bool) -> list[tuple[str, np.ndarray, bool]]:
    """(GGUF name, data, is Q4_0) for one store tensor (kv_b gives two)."""
    import gguf

    arr = t.float().numpy()
    if hf.endswith("kv_b_proj.weight"):
        i = hf.split(".")[2]
        k_b, v_b = split_kv_b(arr, cfg)
        return [(f"blk.{i}.attn_k_b.weight", k_b, False), (f"blk.{i}.attn_v_b.weight", v_b, False)]
    name = gguf_name(hf)
    if not float_trunk and name.split(".")[-2] in Q4:
        return [(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_0), True)]
    return [(name, arr.astype(np.float32), False)]


def metadata(w, cfg: dict) -> None:
    """Every key convert_hf_to_gguf.py writes for a DeepSeek-V3 config (tokenizer aside)."""
    import gguf

    w.add_name(f"{cfg['model_type']}-synthetic")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])  # the dense layers' width (none here)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["qk_rope_head_dim"])
    rs = cfg.get("rope_scaling") or {}
    if (rs.get("type") or rs.get("rope_type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rs.get("beta_fast", 32.0))
        w.add_rope_scaling_yarn_beta_slow(rs.get("beta_slow", 1.0))
        if rs.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rs["mscale_all_dim"])
    w.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    if cfg.get("q_lora_rank"):
        w.add_q_lora_rank(cfg["q_lora_rank"])
    kl, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_kv_lora_rank(kl)
    w.add_key_length(kl + rope)
    w.add_value_length(kl)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + rope)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_shared_count(cfg["n_shared_experts"])
    w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError("deepseek-v3 GGUF: only sigmoid scoring is written")
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if cfg.get("n_group"):
        w.add_expert_group_count(cfg["n_group"])
        w.add_expert_group_used_count(cfg["topk_group"])
    w.add_vocab_size(cfg["vocab_size"])


def declare_experts(w, cfg: dict, moe_layers: list[int]) -> None:
    """Stacked Q4_0 ffn_{gate,up,down}_exps [E, N, K/32*18], in synth_gguf.expert_parts order."""
    import gguf

    e, d, inter = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    sizes = {"gate": (inter, d), "up": (inter, d), "down": (d, inter)}
    for i in moe_layers:
        for part in ("gate", "up", "down"):
            n, k = sizes[part]
            shape = [e, n, k // synth.GROUP * 18]
            w.add_tensor_info(f"blk.{i}.ffn_{part}_exps.weight", shape, np.dtype(np.uint8), int(np.prod(shape)),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)


def open_writer(path: Path, cfg: dict, trunk: list[tuple[str, torch.Tensor]], moe_layers: list[int],
                float_trunk: bool = False):
    """Declare every tensor, write header and trunk; the caller streams each MoE layer's expert
    stacks (gate, up, down) and closes. ``trunk``: the store's tensors in trunk_spec order."""
    import gguf

    from . import gguf_writer as synth_gguf
    if cfg["model_type"] != "deepseek_v3":
        raise ValueError(f"deepseek2 GGUF: a deepseek_v3 config (got {cfg['model_type']})")
    if cfg["first_k_dense_replace"] != 0 or moe_layers != list(range(cfg["num_hidden_layers"])):
        raise ValueError("deepseek2 GGUF: every layer must be MoE (the synthetic trunk has no dense MLP)")
    w = gguf.GGUFWriter(path, "deepseek2")
    metadata(w, cfg)
    synth_gguf.file_and_vocab_metadata(w, cfg)
    arrays = []
    for hf, t in trunk:
        for name, arr, is_q4 in trunk_arrays(hf, t, cfg, float_trunk):
            if is_q4:
                shape = list(t.shape)
                w.add_tensor_info(name, shape[:-1] + [shape[-1] // synth.GROUP * 18], np.dtype(np.uint8), arr.nbytes,
                                  raw_dtype=gguf.GGMLQuantizationType.Q4_0)
            else:
                w.add_tensor_info(name, list(arr.shape), np.dtype(np.float32), arr.nbytes)
            arrays.append(arr)
    declare_experts(w, cfg, moe_layers)
    return synth_gguf.write_header_and_trunk(w, arrays)
