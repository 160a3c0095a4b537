"""An HF-style config dict and exact tensor bytes from a GGUF header (for ``moemesh plan``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsupportedArchitecture
from .stored import Stored

# GGUF architecture -> HF model_type (llama with experts is Mixtral)
GGUF_TYPES = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "olmoe": "olmoe", "gpt-oss": "gpt_oss",
              "deepseek2": "deepseek_v3", "llama": "llama"}


def gguf_config(path: Path) -> tuple[dict[str, Any], Any]:
    from gguf import GGUF_MAGIC, GGUFReader


    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4 or int.from_bytes(magic, "little") != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        r = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable GGUF header (truncated or corrupt file?): {exc}") from None
    field = r.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in GGUF_TYPES:
        raise UnsupportedArchitecture(f"{path}: GGUF architecture {arch!r}; plan reads {', '.join(sorted(GGUF_TYPES))}")

    def meta(key: str, default: Any = None) -> Any:
        f = r.fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}  # GGUF order: [in, out]
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    d, vocab = shapes["token_embd.weight"]
    heads = int(meta("attention.head_count"))
    cfg: dict[str, Any] = {
        "model_type": GGUF_TYPES[arch], "hidden_size": d, "vocab_size": vocab,
        "num_hidden_layers": int(meta("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", d // heads)),
        "intermediate_size": int(meta("feed_forward_length", 0) or 0),
        "moe_intermediate_size": int(meta("expert_feed_forward_length", 0) or 0),
        "num_experts": int(meta("expert_count", 0) or 0), "num_experts_per_tok": int(meta("expert_used_count", 0) or 0),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
    }
    if arch == "llama" and cfg["num_experts"]:
        cfg["model_type"] = "mixtral"
    if arch == "gpt-oss":
        cfg["intermediate_size"] = cfg["moe_intermediate_size"]
    if arch == "qwen2moe":
        cfg["shared_expert_intermediate_size"] = int(meta("expert_shared_feed_forward_length", 0) or 0)
    if arch == "deepseek2":
        rope = int(meta("rope.dimension_count"))
        cfg.update(q_lora_rank=meta("attention.q_lora_rank"), kv_lora_rank=int(meta("attention.kv_lora_rank")),
                   qk_rope_head_dim=rope, qk_nope_head_dim=int(meta("attention.key_length")) - rope,
                   v_head_dim=int(meta("attention.value_length")), n_routed_experts=cfg.pop("num_experts"),
                   n_shared_experts=int(meta("expert_shared_count", 0) or 0),
                   first_k_dense_replace=int(meta("leading_dense_block_count", 0) or 0), moe_layer_freq=1)
    stored = Stored("gguf", 1, 0, 0, 0)
    for t in r.tensors:
        n = int(t.n_bytes)
        stored.tensor_bytes += n
        stored.params += int(t.n_elements)
        stored.dtypes[t.tensor_type.name] = stored.dtypes.get(t.tensor_type.name, 0) + n
        if "_exps." in t.name:
            stored.expert_bytes += n
    return cfg, stored
