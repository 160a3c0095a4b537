"""kimi_k25 (Kimi K2.5): a vision tower and projector around a DeepSeek-V3 text model (its
``text_config``; model_type ``kimi_k2`` or ``deepseek_v3``). This builds the text model only.

Published checkpoints store it as ``language_model.model.*`` and ``language_model.lm_head.*``
(the vision parts as ``vision_tower.*``, ``mm_projector.*``); the builder reads the canonical
names through ``ArchSpec.aliases``. Moonshot's release quantizes the routed experts to int4
(compressed-tensors ``pack-quantized``), which is not read yet: such a checkpoint is refused
with that reason instead of failing on a missing tensor.
"""
from __future__ import annotations

from typing import Any

from ..errors import UnsupportedArchitecture
from . import deepseek_v3
from .deepseek_v2 import DeepseekArgs, DeepseekBuilder, mla_shape
from .spec import ArchSpec


def args_from_config(cfg: dict[str, Any]) -> DeepseekArgs:
    text = cfg["text_config"]
    for where in (cfg, text):
        method = (where.get("quantization_config") or {}).get("quant_method")
        if method:
            raise UnsupportedArchitecture(f"kimi_k25: {method} quantized weights are not read yet "
                                          "(a bf16 or fp32 copy of the text model loads)")
    args = deepseek_v3.args_from_config(text)
    args.model_type = "kimi_k25"
    args.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return args


ARCH = ArchSpec("kimi_k25", args_from_config, builder=DeepseekBuilder, shared_name="shared_experts",
                aliases=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
                shape=lambda args, cfg, name: mla_shape(args, cfg["text_config"], name))  # text model only
