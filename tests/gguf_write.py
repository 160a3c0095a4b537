"""Tiny HF checkpoints written as GGUF the way llama.cpp's convert_hf_to_gguf.py writes them
(gpt-oss: conversion/gpt_oss.py; DeepSeek-V2/V3: conversion/deepseek.py DeepseekV2Model), with
the routed experts in a chosen ggml type, independently of moemesh's reader (names spelled out
here, not taken from models/*.py).

``encode`` makes the expert bytes: F32/F16 as is, Q8_0/Q4_0/MXFP4 with gguf-py's quantizers,
K-quants and IQ4_XS as random but valid blocks (gguf-py has no quantizer for them: random bytes
with every fp16 scale field overwritten by a sane value). The writers put the reference values
back into the HF model: each expert weight becomes ``gguf.quants.dequantize`` of its bytes, so the
transformers model and the GGUF hold the same function.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from moemesh.benchkit.synth_blocks import F16_FIELDS
from moemesh.benchkit.synth_blocks import random_blocks as synth_random_blocks

QUANTIZED_BY_GGUF = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.MXFP4, Q.BF16)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """uint8 [rows, row_bytes]: random valid blocks (benchkit/synth_blocks.py) whose values have about ``std``."""
    block, size = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = synth_random_blocks(qtype, rows, cols, rng, 1.0).reshape(nb, size)
    unit = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).std()
    for off in F16_FIELDS[qtype]:  # values are linear in d (and dmin)
        raw[:, off:off + 2] = np.full(nb, std / unit, np.float16).view(np.uint8).reshape(nb, 2)
    d = rng.uniform(0.5, 1.5, (nb, len(F16_FIELDS[qtype])))  # vary the scales per block too
    for j, off in enumerate(F16_FIELDS[qtype]):
        cur = raw[:, off:off + 2].copy().view(np.float16)[:, 0].astype(np.float32)
        raw[:, off:off + 2] = (cur * d[:, j]).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or array to write, the float32 values they decode to) for a [..., rows, cols] weight."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        h = w.astype(np.float16)
        return h, h.astype(np.float32)
    if qtype in QUANTIZED_BY_GGUF:
        raw = gguf.quants.quantize(w, qtype)
    else:
        lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
        raw = np.stack([random_blocks(qtype, rows, cols, rng, float(w.std()) or 0.05)
                        for _ in range(int(np.prod(lead)))]).reshape(*lead, rows, -1)
    return raw, gguf.quants.dequantize(raw, qtype).astype(np.float32)


def _add(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: Q) -> None:
    if qtype in (Q.F32, Q.F16):
        w.add_tensor(name, np.ascontiguousarray(data))
    else:
        w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)


def _vocab(w: gguf.GGUFWriter, v: int) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<s>", "</s>", "t", "1", "t1"] + [f"x{i}" for i in range(6, v)])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (v - 3))
    w.add_token_merges(["t 1"])
    w.add_eos_token_id(2)



def _add_expert_stacks(w, model, expert_type, rng) -> None:
    """Every MoE layer's routed experts as llama.cpp's stacked ``ffn_*_exps`` tensors in ``expert_type``;
    the model's experts take the values the GGUF holds (so transformers runs the same weights)."""
    for i, dec in enumerate(model.model.layers):
        experts = getattr(dec.mlp, "experts", None)
        if experts is None:
            continue
        for part in ("gate", "up", "down"):
            stacked = _expert_stack(experts, part)  # [E, out, in]
            raw, value = encode(stacked, expert_type, rng)
            _add(w, f"blk.{i}.ffn_{part}_exps.weight", raw, expert_type)
            _set_expert_stack(experts, part, value)

def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gpt_oss(model, path: Path, expert_type: Q, seed: int = 0, split_max_tensors: int = 0) -> None:
    """A transformers GptOssForCausalLM -> llama.cpp ``gpt-oss`` GGUF (F32 trunk, experts in
    ``expert_type``); the model's expert weights are replaced by the decoded GGUF values."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gpt-oss", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rp = cfg.rope_parameters
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rp["factor"])
    w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rp["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rp["beta_slow"])
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    _vocab(w, cfg.vocab_size)
    sd = model.state_dict()
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for hf, g in top.items():
        _add(w, g, sd[hf].float().numpy(), Q.F32)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
                 "mlp.router.bias": "ffn_gate_inp.bias",
                 **{f"self_attn.{a}_proj.{b}": f"attn_{g}.{b}" for a, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
                    for b in ("weight", "bias")}}
        for hf, g in names.items():
            _add(w, f"blk.{i}.{g}", sd[p + hf].float().numpy(), Q.F32)
        experts = model.model.layers[i].mlp.experts
        gate_up = experts.gate_up_proj.detach().float().transpose(-1, -2).numpy()  # [E, 2I, D] interleaved rows
        down = experts.down_proj.detach().float().transpose(-1, -2).numpy()  # [E, D, I]
        gub = experts.gate_up_proj_bias.detach().float().numpy()  # [E, 2I]
        gate_raw, gate = encode(gate_up[:, ::2], expert_type, rng)
        up_raw, up = encode(gate_up[:, 1::2], expert_type, rng)
        down_raw, down_v = encode(down, expert_type, rng)
        _add(w, f"blk.{i}.ffn_gate_exps.weight", gate_raw, expert_type)
        _add(w, f"blk.{i}.ffn_up_exps.weight", up_raw, expert_type)
        _add(w, f"blk.{i}.ffn_down_exps.weight", down_raw, expert_type)
        _add(w, f"blk.{i}.ffn_gate_exps.bias", np.ascontiguousarray(gub[:, ::2]), Q.F32)
        _add(w, f"blk.{i}.ffn_up_exps.bias", np.ascontiguousarray(gub[:, 1::2]), Q.F32)
        _add(w, f"blk.{i}.ffn_down_exps.bias", experts.down_proj_bias.detach().float().numpy(), Q.F32)
        new = np.empty_like(gate_up)
        new[:, ::2], new[:, 1::2] = gate, up
        with torch.no_grad():  # the HF model now holds exactly the GGUF's values
            experts.gate_up_proj.copy_(torch.from_numpy(new).transpose(-1, -2))
            experts.down_proj.copy_(torch.from_numpy(down_v).transpose(-1, -2))
    _finish(w)


def write_deepseek(model, path: Path, expert_type: Q, seed: int = 0, split_max_tensors: int = 0,
                   trunk_type: Q = Q.F32) -> None:
    """A transformers DeepseekV2/V3ForCausalLM -> llama.cpp ``deepseek2`` GGUF (kv_b split per head into
    attn_k_b / attn_v_b, experts stacked in ``expert_type``; the trunk's matrices in ``trunk_type`` where
    their rows are whole blocks, else F32, as a mixed llama.cpp quantization); the model's weights are
    replaced by the decoded GGUF values."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    v3 = cfg.model_type == "deepseek_v3"
    w = gguf.GGUFWriter(str(path), "deepseek2", split_max_tensors=split_max_tensors)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    rp = dict(cfg.rope_parameters or {})
    if rp.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rp.get("beta_fast", 32.0))
        w.add_rope_scaling_yarn_beta_slow(rp.get("beta_slow", 1.0))
        if rp.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * rp["mscale_all_dim"])
    w.add_rope_freq_base(rp.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    kl, rope, nope, vd = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    w.add_kv_lora_rank(kl)
    w.add_key_length(kl + rope)
    w.add_value_length(kl)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(vd)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if getattr(cfg, "norm_topk_prob", False):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    if v3:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if getattr(cfg, "n_group", None):
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    _vocab(w, cfg.vocab_size)
    sd = model.state_dict()
    attn = {"q_proj": "attn_q", "q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b",
            "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm", "o_proj": "attn_output"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
             **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")},
             **{f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
             **{f"self_attn.{k}.{b}": f"{v}.{b}" for k, v in attn.items() for b in ("weight", "bias")}}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    h = cfg.num_attention_heads
    params = dict(model.named_parameters())

    def trunk(name: str, hf: str, arr: np.ndarray) -> None:
        """Write one trunk tensor, in trunk_type where it fits, and give the model the decoded values."""
        block = GGML_QUANT_SIZES[trunk_type][0]
        if trunk_type == Q.F32 or arr.ndim != 2 or arr.shape[1] % block:
            _add(w, name, arr, Q.F32)
            return
        raw, value = encode(arr, trunk_type, rng)
        _add(w, name, raw, trunk_type)
        with torch.no_grad():
            params[hf].copy_(torch.from_numpy(value))

    for hf, t in sd.items():
        arr = t.float().numpy()
        if hf in top:
            trunk(top[hf], hf, arr)
            continue
        _, _, i, rest = hf.split(".", 3)
        if ".experts." in rest:
            continue
        if rest == "self_attn.kv_b_proj.weight":
            kv = arr.reshape(h, nope + vd, kl)
            _add(w, f"blk.{i}.attn_k_b.weight", np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1)), Q.F32)
            _add(w, f"blk.{i}.attn_v_b.weight", np.ascontiguousarray(kv[:, nope:]), Q.F32)
            continue
        trunk(f"blk.{i}.{layer[rest]}", hf, arr) if "norm" not in rest and "mlp.gate." not in rest else \
            _add(w, f"blk.{i}.{layer[rest]}", arr, Q.F32)
    _add_expert_stacks(w, model, expert_type, rng)
    _finish(w)


def _expert_stack(experts, part: str) -> np.ndarray:
    """[E, out, in] of one projection over every expert (transformers 5 fuses them: gate_up_proj [E, 2I, D])."""
    if hasattr(experts, "gate_up_proj"):
        gu = experts.gate_up_proj.detach().float()
        inter = gu.shape[1] // 2
        t = {"gate": gu[:, :inter], "up": gu[:, inter:], "down": experts.down_proj.detach().float()}[part]
        return t.numpy().copy()
    return np.stack([getattr(e, f"{part}_proj").weight.detach().float().numpy() for e in experts])


def _set_expert_stack(experts, part: str, value: np.ndarray) -> None:
    with torch.no_grad():
        v = torch.from_numpy(value)
        if hasattr(experts, "gate_up_proj"):
            inter = experts.gate_up_proj.shape[1] // 2
            target = {"gate": experts.gate_up_proj[:, :inter], "up": experts.gate_up_proj[:, inter:],
                      "down": experts.down_proj}[part]
            target.copy_(v)
            return
        for e, mod in enumerate(experts):
            getattr(mod, f"{part}_proj").weight.copy_(v[e])


def write_glm4moe(model, path: Path, expert_type: Q, seed: int = 0) -> None:
    """A transformers Glm4MoeForCausalLM -> llama.cpp ``glm4moe`` GGUF (conversion/glm.py Glm4MoeModel:
    no q/k permutation, rotary width as rope.dimension_count, sigmoid gating, experts stacked in
    ``expert_type``); block tensor names from gguf-py's own name map; the model's experts are
    replaced by the decoded GGUF values."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "glm4moe")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rp = dict(cfg.rope_parameters or {})
    w.add_rope_freq_base(rp.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(int(head_dim * rp.get("partial_rotary_factor", 0.5)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_group_count(cfg.n_group)  # conversion/base.py writes n_group / topk_group when the config has them
    w.add_expert_group_used_count(cfg.topk_group)
    _vocab(w, cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4_MOE, cfg.num_hidden_layers)
    for hf, t in model.state_dict().items():
        if ".mlp.experts." in hf:
            continue
        if hf.endswith("e_score_correction_bias"):  # gguf-py maps it as exp_probs_b.bias
            g = f"blk.{hf.split('.')[2]}.exp_probs_b.bias"
        else:
            g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert g is not None, hf
        _add(w, g, t.float().numpy(), Q.F32)
    _add_expert_stacks(w, model, expert_type, rng)
    _finish(w)


def write_qwen3next(model, path: Path, expert_type: Q, seed: int = 0) -> None:
    """A transformers Qwen3NextForCausalLM -> llama.cpp ``qwen3next`` GGUF as conversion/qwen.py
    Qwen3NextModel writes it: in_proj_qkvz regrouped into attn_qkv (all q, all k, all v) + attn_gate
    (z), (1 + w) norms stored as w + 1 (not the DeltaNet's norm), A_log as -exp(A_log), conv1d
    squeezed, dt_bias as ssm_dt.bias, experts stacked in ``expert_type``; other names from gguf-py's
    map. The model's experts are replaced by the decoded GGUF values."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    n = cfg.num_hidden_layers
    w = gguf.GGUFWriter(str(path), "qwen3next")
    w.add_block_count(n)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    rp = dict(cfg.rope_parameters or {})
    w.add_rope_freq_base(rp.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(cfg.linear_key_head_dim)
    w.add_ssm_group_count(cfg.linear_num_key_heads)
    w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
    w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
    # add_recurrent_layers (newer gguf-py): the same key
    w.add_array("qwen3next.attention.recurrent_layers", [t == "linear_attention" for t in cfg.layer_types])
    w.add_full_attention_interval(getattr(cfg, "full_attention_interval", 4) or 4)
    w.add_rope_dimension_count(int(cfg.head_dim * rp.get("partial_rotary_factor", 0.25)))
    _vocab(w, cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3NEXT, n)
    hk, kd = cfg.linear_num_key_heads, cfg.linear_key_head_dim
    rv = cfg.linear_num_value_heads // hk * cfg.linear_value_head_dim
    for hf, t in model.state_dict().items():
        if ".mlp.experts." in hf:
            continue
        t = t.float()
        bid = hf.split(".")[2] if ".layers." in hf else None
        if hf.endswith("in_proj_qkvz.weight"):
            d = t.shape[1]
            q, k, v, z = t.view(hk, 2 * kd + 2 * rv, d).split([kd, kd, rv, rv], dim=1)
            qkv = torch.cat([q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)])
            _add(w, f"blk.{bid}.attn_qkv.weight", qkv.numpy(), Q.F32)
            _add(w, f"blk.{bid}.attn_gate.weight", z.reshape(-1, d).numpy().copy(), Q.F32)
            continue
        if hf.endswith(".A_log"):
            t = -torch.exp(t)
        elif hf.endswith(".dt_bias"):
            hf = hf[: -len(".dt_bias")] + ".dt_proj.bias"
        elif "conv1d" in hf:
            t = t.squeeze()
        elif hf.endswith("norm.weight") and not hf.endswith("linear_attn.norm.weight"):
            t = t + 1
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert g is not None, hf
        _add(w, g, t.numpy(), Q.F32)
    _add_expert_stacks(w, model, expert_type, rng)
    _finish(w)
