"""deepseek_v3: deepseek_v2's latent attention with sigmoid, bias-corrected group routing.

The router scores experts with a sigmoid, picks the ``topk_group`` groups whose two best scores
(plus ``e_score_correction_bias``) sum highest, then the top experts inside them; the weights are
the unbiased scores, renormalised (``norm_topk_prob``) and scaled by ``routed_scaling_factor``.
transformers 5.23 routes this way whatever ``topk_method``/``scoring_func`` say. RoPE is
interleaved unless ``rope_interleave`` is false. The multi-token-prediction layers
(``num_nextn_predict_layers``) are not built: decoding uses the main layers only, as transformers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..layers.grouped_router import GroupedRouting
from .deepseek_gguf import GGUF as V2_GGUF
from .deepseek_gguf import SIGMOID, gguf_config
from .deepseek_v2 import DeepseekArgs, DeepseekBuilder, deepseek_args, mla_shape
from .spec import ArchSpec

# transformers' DeepseekV3Config defaults, for keys a config.json leaves out
DEFAULTS = dict(n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3, n_shared_experts=1,
                norm_topk_prob=True, rope_interleave=True)


def args_from_config(cfg: dict[str, Any]) -> DeepseekArgs:
    cfg = {**DEFAULTS, **cfg}
    routing = GroupedRouting(
        scoring="sigmoid",
        method="noaux_tc",
        n_group=int(cfg["n_group"] or 1),
        topk_group=int(cfg["topk_group"] or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
    )
    return deepseek_args(cfg, "deepseek_v3", routing, interleaved=bool(cfg.get("rope_interleave", True)))


GGUF = dataclasses.replace(V2_GGUF, model_type="deepseek_v3", config=lambda meta, shapes: gguf_config(meta, shapes, v3=True),
                           matches=lambda meta: meta(f"{V2_GGUF.arch}.expert_gating_func", 1) == SIGMOID)
ARCH = ArchSpec("deepseek_v3", args_from_config, builder=DeepseekBuilder, shape=mla_shape, gguf=GGUF, shared_name="shared_experts")
