"""llama: the dense baseline (SmolLM2, Llama 2/3 without RoPE scaling)."""
from __future__ import annotations

from typing import Any

from .args import ModelArgs, common_args
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(**common_args(cfg, "llama"), attention_bias=bias, o_bias=bias)


ARCH = ArchSpec("llama", args_from_config)
