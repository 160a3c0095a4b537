"""The GGUF side of benchkit/synth/models.py: a Mixtral-shaped model as llama.cpp's ``llama``
architecture, a gpt-oss-shaped one as its ``gpt-oss`` architecture (DeepSeek-V3 as ``deepseek2``:
benchkit/synth/gguf_deepseek.py), all with stacked Q4_0
experts (``blk.N.ffn_{gate,up,down}_exps``; gpt-oss also their fp32 biases). The real gpt-oss
GGUFs hold MXFP4 experts, which cannot represent our int4 weights; llama.cpp takes any type there.

The header lists every tensor, so all are declared first; the trunk's data is written at once
and the writer is returned for the caller to stream each MoE layer's expert stacks (gate, up,
down, layer by layer) as it generates them. q/k rows are permuted as llama.cpp's converter does
(its ``llama`` RoPE rotates adjacent pairs, HF's rotates halves), so both engines compute the
same function (gpt-oss: NeoX RoPE in both, no permutation). Trunk matrices are Q4_0 (of the same bf16 values moemesh quantizes), norms and
the router F32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import core as synth

NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
         "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
         "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
GPT_OSS_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
                 **{f"self_attn.{p}_proj.{b}": f"attn_{n}.{b}" for p, n in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
                    for b in ("weight", "bias")},
                 "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
                 "mlp.router.bias": "ffn_gate_inp.bias"}
Q4 = {"token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output"}


def gguf_name(hf: str, arch: str = "llama") -> str:
    if hf in TOP:
        return TOP[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{(GPT_OSS_NAMES if arch == 'gpt-oss' else NAMES)[rest]}"


def expert_parts(arch: str) -> list[str]:
    """The per-layer expert tensors in the order they are declared and written."""
    return ["gate", "up", "down"] + (["gate_bias", "up_bias", "down_bias"] if arch == "gpt-oss" else [])


def expert_arrays(arch: str, w: dict) -> dict[str, np.ndarray]:
    """One expert's share of each stacked tensor (Q4_0 bytes; fp32 biases)."""
    out = {p: synth.q4_0_bytes(*w[p]) for p in ("gate", "up", "down")}
    if arch == "gpt-oss":
        inter = w["gate"][0].shape[0]
        out.update(gate_bias=w["gate_up_bias"][:inter], up_bias=w["gate_up_bias"][inter:], down_bias=w["down_bias"])
    return out


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_array(hf: str, t: torch.Tensor, cfg: dict, arch: str,
                 float_trunk: bool = False) -> tuple[np.ndarray, bool]:
    """(data to write, is Q4_0); float_trunk: F32 matrices (a parity check isolating the experts)."""
    import gguf

    arr = t.float().numpy()
    if arch == "llama" and hf.endswith("q_proj.weight"):
        arr = permute(arr, cfg["num_attention_heads"])
    elif arch == "llama" and hf.endswith("k_proj.weight"):
        arr = permute(arr, cfg["num_key_value_heads"])
    name = gguf_name(hf, arch)
    if not float_trunk and name.endswith(".weight") and name.split(".")[-2] in Q4:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_0), True
    return arr.astype(np.float32), False


def metadata(w, cfg: dict, arch: str) -> None:
    import gguf

    w.add_name(f"{cfg['model_type']}-synthetic")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    if arch == "gpt-oss":  # as convert_hf_to_gguf's GptOssModel writes them
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_expert_feed_forward_length(cfg["intermediate_size"])
        w.add_sliding_window(cfg["sliding_window"])
        rs = cfg["rope_scaling"]
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    file_and_vocab_metadata(w, cfg)


def file_and_vocab_metadata(w, cfg: dict) -> None:
    import gguf

    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    v = cfg["vocab_size"]  # a minimal vocabulary: benchmarks feed token ids, nothing is tokenized
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<|bos|>", "<|eos|>"] + [f"t{i}" for i in range(3, v)])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (v - 3))
    w.add_token_merges(["t 1"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)


def open_writer(path: Path, arch: str, cfg: dict, trunk: list[tuple[str, torch.Tensor]], moe_layers: list[int],
                float_trunk: bool = False):
    """Declare every tensor, write header and trunk; the caller writes the expert stacks in order
    (for each MoE layer: expert_parts(arch), weights [E, N, K/32*18] Q4_0 bytes) and closes."""
    import gguf

    if (arch, cfg["model_type"]) not in (("llama", "mixtral"), ("gpt-oss", "gpt_oss")):
        raise ValueError(f"synthetic GGUF: mixtral as 'llama' or gpt_oss as 'gpt-oss' (deepseek2: gguf_deepseek) "
                         f"(got {arch}, {cfg['model_type']})")
    q4 = gguf.GGMLQuantizationType.Q4_0
    w = gguf.GGUFWriter(path, arch)
    metadata(w, cfg, arch)
    arrays = []
    for hf, t in trunk:
        arr, is_q4 = tensor_array(hf, t, cfg, arch, float_trunk)
        name = gguf_name(hf, arch)
        if is_q4:
            shape = list(t.shape)
            w.add_tensor_info(name, shape[:-1] + [shape[-1] // synth.GROUP * 18], np.dtype(np.uint8), arr.nbytes, raw_dtype=q4)
        else:
            w.add_tensor_info(name, list(arr.shape), np.dtype(np.float32), arr.nbytes)
        arrays.append(arr)
    e, d, inter = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]  # both: the expert width
    sizes = {"gate": (inter, d), "up": (inter, d), "down": (d, inter)}
    for i in moe_layers:
        for part in expert_parts(arch):
            if part.endswith("_bias"):
                n = sizes[part[:-5]][0]
                w.add_tensor_info(f"blk.{i}.ffn_{part[:-5]}_exps.bias", [e, n], np.dtype(np.float32), e * n * 4)
                continue
            n, k = sizes[part]
            shape = [e, n, k // synth.GROUP * 18]
            w.add_tensor_info(f"blk.{i}.ffn_{part}_exps.weight", shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=q4)
    return write_header_and_trunk(w, arrays)


def write_header_and_trunk(w, arrays: list[np.ndarray]):
    """Every tensor is declared: write the header, then the trunk's data (declared first); the
    caller streams the expert stacks after it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for arr in arrays:
        w.write_tensor_data(arr)
    return w
