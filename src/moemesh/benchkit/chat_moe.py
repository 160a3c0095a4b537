"""A small random MoE that can chat (SmolLM2's tokenizer and chat template), as an int4 expert store:
what the soak and the API fuzz runs serve. Its words are random; the server's work is real."""
from __future__ import annotations

import json
from pathlib import Path


def build_chat_moe_store(work_dir: str | Path, *, hidden: int = 64, layers: int = 2, experts: int = 16,
                         moe_intermediate: int = 64, seed: int = 0) -> Path:
    """A random qwen3_moe (top-2) converted to an int4 expert store under ``work_dir``; reused when
    already built. Needs transformers (the test extra)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from ..loading.convert import convert
    from ..loading.loader import load_model

    root = Path(work_dir)
    store = root / "store"
    if (store / "manifest.json").is_file():
        return store
    tok = load_model("smollm2").tokenizer
    assert tok is not None
    cfg = Qwen3MoeConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         moe_intermediate_size=moe_intermediate, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=hidden // 4, num_experts=experts, num_experts_per_tok=2,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    hf = root / "hf"
    model.generation_config.eos_token_id = None
    model.save_pretrained(hf)
    tok.backend.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return convert(hf, store, "int4", progress=False)
