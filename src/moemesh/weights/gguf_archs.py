"""How each GGUF architecture maps onto its HF model: tensor names, config keys, rotary row order.

llama (dense, and Mixtral: a llama GGUF with ``llama.expert_count``) and qwen3moe. A GGUF stores a
layer's experts as one 3-D tensor ``blk.N.ffn_{gate,up,down}_exps`` [E, out, in]; its HF name
template holds ``{e}``, and the reader splits it into one zero-copy tensor per expert.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from moemesh.errors import CheckpointError

MetaGetter = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ArchSpec:
    name: str
    hf_tensor_name: Callable[[str], str | None]  # GGUF tensor name -> HF name (None: unknown)
    build_config: Callable[[MetaGetter, dict[str, tuple[int, ...]]], dict]  # (meta, HF shapes) -> config
    row_permutation: Callable[[str, tuple[int, ...], dict], np.ndarray | None]  # (HF name, shape, config)


_ATTN = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_BLOCK = MappingProxyType({
    **_ATTN,
    "ffn_gate_inp": "block_sparse_moe.gate",  # Mixtral
    "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
})
_QWEN3MOE_BLOCK = MappingProxyType({
    **_ATTN,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
    "ffn_up_exps": "mlp.experts.{e}.up_proj",
    "ffn_down_exps": "mlp.experts.{e}.down_proj",
})
_TOP = MappingProxyType({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "rope_freqs": "rope_freqs",  # llama3 rope frequency factors; no HF counterpart, kept as is
})
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def _tensor_namer(block: MappingProxyType) -> Callable[[str], str | None]:
    def name(gguf_name: str) -> str | None:
        if m := _BLOCK_RE.fullmatch(gguf_name):
            part = block.get(m.group(2))
            return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
        if m := _TOP_RE.fullmatch(gguf_name):
            top = _TOP.get(m.group(1))
            return None if top is None else f"{top}.{m.group(2)}"
        return None

    return name


def _base_config(arch: str, meta: MetaGetter, shapes: dict[str, tuple[int, ...]]) -> dict:
    def need(key: str) -> Any:
        value = meta(f"{arch}.{key}", None)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    embed = shapes.get("model.embed_tokens.weight")
    vocab = meta(f"{arch}.vocab_size", None) or (embed[0] if embed else len(meta("tokenizer.ggml.tokens", [])))
    return {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length", 0) or 0),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "rope_scaling": None,
    }


def _llama_config(meta: MetaGetter, shapes: dict[str, tuple[int, ...]]) -> dict:
    config = _base_config("llama", meta, shapes)
    config["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in shapes
    scaling = meta("llama.rope.scaling.type", None)
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(meta("llama.rope.scaling.factor", 1.0))}
        if (orig := meta("llama.rope.scaling.original_context_length", None)) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    experts = int(meta("llama.expert_count", 0) or 0)
    if experts:  # Mixtral: llama.cpp writes it as a llama with experts
        w1 = shapes.get("model.layers.0.block_sparse_moe.experts.0.w1.weight")
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                      num_experts_per_tok=int(meta("llama.expert_used_count", 2)),
                      intermediate_size=int(w1[0]) if w1 else config["intermediate_size"])
    else:
        config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    return config


def _qwen3moe_config(meta: MetaGetter, shapes: dict[str, tuple[int, ...]]) -> dict:
    config = _base_config("qwen3moe", meta, shapes)
    experts = int(meta("qwen3moe.expert_count", 0) or 0)
    if not experts:
        raise CheckpointError("GGUF metadata lacks qwen3moe.expert_count")
    gate = shapes.get("model.layers.0.mlp.experts.0.gate_proj.weight")
    config.update(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=experts,
        num_experts_per_tok=int(meta("qwen3moe.expert_used_count", 8)),
        moe_intermediate_size=int(meta("qwen3moe.expert_feed_forward_length", 0) or (gate[0] if gate else 0)),
        norm_topk_prob=bool(meta("qwen3moe.expert_weights_norm", True)),  # llama.cpp normalizes for qwen3moe
        decoder_sparse_step=1, mlp_only_layers=[],
    )
    return config


def rotary_unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's convert-time permute of q/k rows.

    The converter turns each head's [half0 | half1] rotary layout into interleaved pairs:
    W.reshape(n_head, 2, d/2, in).swapaxes(1, 2). HF row r is GGUF row perm[r].
    """
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _llama_row_permutation(hf_name: str, shape: tuple[int, ...], config: dict) -> np.ndarray | None:
    # q/k weights and biases alike: rows are grouped per head (n_head for q, n_kv_head for k)
    if ".self_attn.q_proj." in hf_name:
        return rotary_unpermute_rows(shape[0], config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return rotary_unpermute_rows(shape[0], config["num_key_value_heads"])
    return None


def _no_permutation(hf_name: str, shape: tuple[int, ...], config: dict) -> None:
    return None  # qwen3moe: llama.cpp's converter keeps HF's rotary row order (NEOX rope)


ARCHS = MappingProxyType({
    "llama": ArchSpec("llama", _tensor_namer(_LLAMA_BLOCK), _llama_config, _llama_row_permutation),
    "qwen3moe": ArchSpec("qwen3moe", _tensor_namer(_QWEN3MOE_BLOCK), _qwen3moe_config, _no_permutation),
})
