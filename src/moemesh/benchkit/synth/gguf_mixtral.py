"""A Mixtral-layout HF checkpoint (float weights: e.g. `moemesh moefy`'s split SmolLM2, the demo model)
written as a Q4_0 GGUF in llama.cpp's ``llama`` architecture with stacked experts, for speed benchmarks
against llama.cpp (bench/decode.py). The experts and trunk matrices are quantized to Q4_0 from the
float weights (moemesh quantizes the same floats to its own int4 format: the same shapes and bytes per
weight, not the same bits); q/k rows are permuted as llama.cpp's converter does (gguf_writer.permute).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import gguf_writer

TRUNK = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "post_attention_layernorm.weight", "block_sparse_moe.gate.weight")
EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}  # gguf_writer.expert_parts("llama") order -> Mixtral's names


def write_mixtral_gguf(hf_dir: Path, out: Path) -> Path:
    """hf_dir (config.json + model.safetensors, Mixtral layout) -> out (written atomically); returns out."""
    import gguf
    from safetensors import safe_open

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    if cfg.get("model_type") != "mixtral":
        raise ValueError(f"{hf_dir}: expected a Mixtral-layout checkpoint, got model_type {cfg.get('model_type')!r}")
    layers = cfg["num_hidden_layers"]
    with safe_open(str(Path(hf_dir) / "model.safetensors"), "pt") as f:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        names += [] if cfg.get("tie_word_embeddings") else ["lm_head.weight"]  # tied: llama.cpp reuses token_embd
        names += [f"model.layers.{i}.{n}" for i in range(layers) for n in TRUNK]
        trunk = [(n, f.get_tensor(n).float()) for n in names]
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            w = gguf_writer.open_writer(tmp, "llama", cfg, trunk, list(range(layers)))
            for i in range(layers):
                for part in gguf_writer.expert_parts("llama"):
                    stack = [gguf.quants.quantize(f.get_tensor(f"model.layers.{i}.block_sparse_moe.experts.{x}."
                                                               f"{EXPERT[part]}.weight").float().numpy(),
                                                  gguf.GGMLQuantizationType.Q4_0)
                             for x in range(cfg["num_local_experts"])]
                    w.write_tensor_data(np.stack(stack))
            w.close()
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out
