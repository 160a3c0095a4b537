"""ModelArgs: one explicit description of a decoder-only transformer, MoE or dense.

Each architecture file turns an HF ``config.json`` dict into ModelArgs; everything the shared
layers need is spelled out here so no layer ever reads a raw config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..layers.gated_deltanet import DeltaNetConfig
from ..layers.grouped_router import GroupedRouting


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    intermediate_size: int  # dense FFN width (dense layers)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (qwen2_moe's qkv_bias)
    o_bias: bool = False
    qk_norm: str | None = None  # None | "head" (qwen3_moe: per head) | "full" (olmoe: whole projection)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: list[int] = field(default_factory=list)  # indices of layers with an MoE FFN
    shared_expert_intermediate_size: int = 0  # qwen2_moe's shared expert (0 = none)
    shared_expert_gate: bool = False  # qwen2_moe: sigmoid(Linear(D, 1)) scales the shared expert
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    rope_scaling: dict | None = None  # scaled RoPE parameters (rope_type "yarn"); None = default RoPE
    # gpt_oss: per-layer "sliding_attention" | "full_attention" (None: sliding_window everywhere),
    # and its experts' clamped SwiGLU
    layer_types: list[str] | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float | None = None
    rotary_dim: int | None = None  # partial rotary: RoPE on the first rotary_dim dims of each head (None: all)
    routing: GroupedRouting | None = None  # sigmoid/grouped routers (DeepSeek, GLM, MiniMax); None: top-k softmax
    attn_output_gate: bool = False  # Qwen3-Next / Qwen3.5: attention output times sigmoid(a gate from q_proj)
    linear_attn: DeltaNetConfig | None = None  # hybrid models: the layers whose layer_types say "linear_attention"
    mrope_section: list[int] | None = None  # Qwen3.5: M-RoPE's frequencies per (time, row, column) axis

    @property
    def rope_dim(self) -> int:
        """Dims of each head that RoPE rotates (the RoPE tables' width)."""
        return self.rotary_dim or self.head_dim

    def is_linear_layer(self, layer: int) -> bool:
        """A linear-attention layer (a recurrent state instead of a KV cache)."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    def recurrent_state_bytes(self) -> int:
        """One sequence's recurrent state over every linear-attention layer (fp32); 0 without any."""
        if self.linear_attn is None:
            return 0
        return sum(map(self.is_linear_layer, range(self.num_layers))) * self.linear_attn.state_shape().nbytes()

    def cache_index(self, layer: int) -> int:
        """The layer's index among the layers of its kind: attention layers number their KV cache
        entries 0..n-1 and linear-attention layers their recurrent states likewise."""
        return sum(self.is_linear_layer(j) == self.is_linear_layer(layer) for j in range(layer))

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def cache_layout(self) -> dict[str, Any]:
        """What the KV cache stores per token and layer, as make_cache's keyword arguments
        (deepseek's MLA overrides it: one latent 'head', values inside the keys)."""
        return dict(num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)


def rope_theta_of(cfg: dict[str, Any], default: float = 10000.0) -> float:
    """transformers 5 writes ``rope_parameters``; older configs write ``rope_theta``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "yarn", None):
        from ..errors import UnsupportedArchitecture

        raise UnsupportedArchitecture(f"RoPE scaling type {rope_type!r} is not supported yet")
    return float(params.get("rope_theta", cfg.get("rope_theta", default)))


def rope_scaling_of(cfg: dict[str, Any]) -> dict | None:
    """The scaled-RoPE parameters (``rope_parameters`` or the older ``rope_scaling``) when their
    type is not the default one, else None. ``rope_theta_of`` rejects unsupported types."""
    for params in (cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}):
        if (params.get("rope_type") or params.get("type") or "default") != "default":
            return dict(params)
    return None


def rotary_dim_of(cfg: dict[str, Any], head_dim: int) -> int | None:
    """Partial rotary from ``rope_parameters.partial_rotary_factor`` (transformers 5), a top-level
    ``partial_rotary_factor`` or ``rotary_dim`` (MiniMax's config.json); None when every dim rotates."""
    params = cfg.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    dim = int(head_dim * float(factor)) if factor is not None else cfg.get("rotary_dim")
    return None if dim is None or int(dim) >= head_dim else int(dim)


def eos_ids_of(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [int(eos)]


def common_args(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Fields every architecture reads the same way from an HF config."""
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return dict(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta_of(cfg),
        rope_scaling=rope_scaling_of(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        intermediate_size=int(cfg.get("intermediate_size", 0)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids_of(cfg),
    )


def routed_args(cfg: dict[str, Any], model_type: str, moe_layers: list[int], intermediate_key: str,
                norm_topk_default: bool) -> dict[str, Any]:
    """``common_args`` plus the attention biases and routed-expert fields the Qwen-style MoE
    families (qwen3_moe, olmoe) read alike."""
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        **common_args(cfg, model_type),
        attention_bias=bias,
        o_bias=bias,
        num_experts=num_experts_of(cfg),
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg[intermediate_key]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", norm_topk_default)),
        moe_layers=moe_layers,
    )


def num_experts_of(cfg: dict[str, Any]) -> int:
    """Checkpoints say ``num_experts`` or ``num_local_experts`` (transformers 5 writes the latter)."""
    n = cfg.get("num_experts", cfg.get("num_local_experts"))
    if n is None:
        raise KeyError("config has neither num_experts nor num_local_experts")
    return int(n)
