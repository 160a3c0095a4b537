"""glm_moe_dsa (GLM-5): DeepSeek-V3's layout (multi-head latent attention with interleaved RoPE,
sigmoid routing with a correction bias, shared experts, dense first layers per ``mlp_layer_types``)
with DeepSeek sparse attention: an indexer per "full" layer picks each query's ``index_topk`` keys
and "shared" layers reuse that pick (layers/dsa.py). The cache is kvcache/indexed.py's (the
dense latent cache + the indexer's keys); TurboQuant KV is refused for this family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from ..layers.dsa import Indexer, SparseMLA
from ..layers.grouped_router import GroupedRouting
from ..layers.norm import RMSNorm
from .args import ModelArgs
from .deepseek_v2 import LORA_NORM_EPS, DeepseekArgs, DeepseekBuilder, deepseek_args, mla_shape
from .shape import Linear, ModelShape
from .spec import ArchSpec

# transformers' GlmMoeDsaConfig defaults (GLM-5's sizes), for keys a config.json leaves out
DEFAULTS = dict(n_group=1, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=3, n_shared_experts=1,
                norm_topk_prob=True, index_topk=2048, index_head_dim=128, index_n_heads=32, rms_norm_eps=1e-5)


@dataclass
class DsaArgs(DeepseekArgs):
    index_topk: int = 2048
    index_heads: int = 32
    index_head_dim: int = 128
    indexer_types: list[str] | None = None  # per layer "full" (own indexer) | "shared" (the previous pick)


def indexer_types(cfg: dict[str, Any], n: int) -> list[str]:
    """transformers' rule: a pattern string ("FSS..."), else "full" every ``index_topk_freq`` layers
    counted from ``index_skip_topk_offset``."""
    types = cfg.get("indexer_types")
    if types is None and (pattern := cfg.get("index_topk_pattern")) is not None:
        types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    if types is None:
        freq, offset = max(int(cfg.get("index_topk_freq", 1)), 1), int(cfg.get("index_skip_topk_offset", 2))
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    if len(types) != n or not set(types) <= {"full", "shared"} or types[0] != "full":
        raise CheckpointError(f"glm_moe_dsa: bad indexer_types {types!r} for {n} layers (the first must be full)")
    return list(types)


def args_from_config(cfg: dict[str, Any]) -> DsaArgs:
    cfg = {**DEFAULTS, **cfg}
    routing = GroupedRouting(scoring="sigmoid", method="noaux_tc", n_group=int(cfg["n_group"] or 1),
                             topk_group=int(cfg["topk_group"] or 1),
                             routed_scaling_factor=float(cfg["routed_scaling_factor"]),
                             norm_topk_prob=bool(cfg["norm_topk_prob"]))
    base = deepseek_args(cfg, "glm_moe_dsa", routing, interleaved=True)
    n = base.num_layers
    mlp_types = cfg.get("mlp_layer_types")
    if mlp_types is not None:
        if len(mlp_types) != n:
            raise CheckpointError(f"glm_moe_dsa: mlp_layer_types has {len(mlp_types)} entries for {n} layers")
        base.moe_layers = [i for i, kind in enumerate(mlp_types) if kind == "sparse"]
    return DsaArgs(**vars(base), index_topk=int(cfg["index_topk"]), index_heads=int(cfg["index_n_heads"]),
                   index_head_dim=int(cfg["index_head_dim"]), indexer_types=indexer_types(cfg, n))


class DsaBuilder(DeepseekBuilder):
    args: DsaArgs

    def attention(self, i: int) -> SparseMLA:
        a, s, m = self.args, self.spec, self.args.mla
        assert m is not None and a.indexer_types is not None
        if m.q_lora_rank is None:
            raise CheckpointError("glm_moe_dsa without q_lora_rank: the indexer reads the q LoRA activation")
        indexer = None
        if a.indexer_types[i] == "full":
            p = s.attn(i, "indexer.")
            indexer = Indexer(sum(t == "full" for t in a.indexer_types[:i]), self.linear([p + "wq_b.weight"]),
                              self.linear([p + "wk.weight"]), self.tensor(p + "k_norm.weight"),
                              self.tensor(p + "k_norm.bias"), self.linear([p + "weights_proj.weight"]),
                              a.index_heads, a.index_head_dim, m.qk_rope_head_dim, a.index_topk)
        bias = (lambda name: [s.attn(i, f"{name}.bias")] if a.attention_bias else None)
        return SparseMLA(
            i, m, a.num_heads, self.linear([s.attn(i, "q_a_proj.weight")], bias("q_a_proj")),
            RMSNorm(self.tensor(s.attn(i, "q_a_layernorm.weight")), LORA_NORM_EPS),
            self.linear([s.attn(i, "q_b_proj.weight")]),
            self.linear([s.attn(i, "kv_a_proj_with_mqa.weight")], bias("kv_a_proj_with_mqa")),
            RMSNorm(self.tensor(s.attn(i, "kv_a_layernorm.weight")), LORA_NORM_EPS),
            self.tensor(s.attn(i, "kv_b_proj.weight")).float(),
            self.linear([s.attn(i, "o_proj.weight")], bias("o_proj")), indexer=indexer,
        )


def dsa_shape(args: ModelArgs, cfg: dict[str, Any], name: str) -> ModelShape:
    """MLA's shape plus each full layer's indexer (wq_b, wk, weights_proj; its LayerNorm small)."""
    assert isinstance(args, DsaArgs) and args.mla is not None and args.indexer_types is not None
    s = mla_shape(args, cfg, name)
    hi, di, d = args.index_heads, args.index_head_dim, args.hidden_size
    for kind in args.indexer_types:
        if kind == "full":
            s.trunk_linears += [Linear(hi * di, int(args.mla.q_lora_rank or 0)), Linear(di, d), Linear(hi, d)]
            s.small_params += 2 * di
    return s


ARCH = ArchSpec("glm_moe_dsa", args_from_config, builder=DsaBuilder, shape=dsa_shape, shared_name="shared_experts")
