"""gpt_oss (OpenAI gpt-oss-20b/120b), as transformers' modeling_gpt_oss.py defines it.

Differences from the shared decoder: q/k/v/o biases; per-head attention sinks; sliding-window and
full attention alternating per ``layer_types``; YaRN RoPE (args.rope_scaling); a biased router
that takes the top k logits and softmaxes over those; experts with biases and a clamped SwiGLU.

Checkpoint layout (transformers 5 ``save_pretrained``): per layer the experts are fused tensors
``mlp.experts.gate_up_proj`` [E, D, 2I] (gate and up interleaved along the last axis) with
``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, D] with ``down_proj_bias`` [E, D]; the
router is ``mlp.router.weight/bias``; sinks are ``self_attn.sinks`` [Hq]. The published
checkpoints store the expert matrices as MXFP4 instead (``*_blocks`` + ``*_scales``), read
through quant/mxfp4.py. One expert for a provider is its (gate, up, down) slice with biases.

Its GGUF (llama.cpp's ``gpt-oss``) splits gate_up into ``ffn_gate_exps`` / ``ffn_up_exps`` [E, I, D]
(+ ``.bias`` [E, I]) and ``ffn_down_exps`` [E, D, I], MXFP4 in the published files; read here as
per-expert ``mlp.experts.E.{gate,up,down}_proj.{weight,bias}``. Sinks are ``attn_sinks.weight``, the
router ``ffn_gate_inp``; sliding layers alternate (llama.cpp's pattern 2: even layers slide).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.attention import Attention
from ..layers.gpt_oss_moe import ClampedSwiGLU, LogitTopKRouter, deinterleave
from ..layers.moe import ExpertProvider, MoEBlock
from ..quant.blocks import BlockLinear, supported_qtypes
from ..quant.qlinear import QuantLinear
from .args import ModelArgs, common_args, num_experts_of
from .build import Builder
from .gguf import ATTN, GGUFSpec, Meta, Shapes, base_config, moe_block, moe_config, need
from .shape import standard_shape
from .spec import ArchSpec

DEFAULT_ALPHA, DEFAULT_LIMIT = 1.702, 7.0


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    n = int(cfg["num_hidden_layers"])
    layer_types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if len(layer_types) != n or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise CheckpointError(f"gpt_oss: bad layer_types {layer_types!r} for {n} layers")
    bias = bool(cfg.get("attention_bias", True))
    common = common_args(cfg, "gpt_oss")
    common["rms_norm_eps"] = float(cfg.get("rms_norm_eps", 1e-5))
    return ModelArgs(
        **common,
        attention_bias=bias,
        o_bias=bias,
        sliding_window=cfg.get("sliding_window"),
        layer_types=list(layer_types),
        num_experts=num_experts_of(cfg),
        top_k=int(cfg.get("num_experts_per_tok") or cfg["experts_per_token"]),  # the published config has both
        moe_intermediate_size=int(cfg["intermediate_size"]),
        moe_layers=list(range(n)),
        swiglu_alpha=float(cfg.get("swiglu_alpha", DEFAULT_ALPHA)),
        swiglu_limit=float(cfg.get("swiglu_limit", DEFAULT_LIMIT)),
    )


def expert_tensors(source, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert in our orientation, fp32: gate_up [2I, D] as [gate; up], its bias [2I],
    down [D, I], its bias [D]. Reads float or MXFP4 (``*_blocks``/``*_scales``) checkpoints."""
    base = f"model.layers.{layer}.mlp.experts."
    split = f"{base}{expert}."
    if source.has(split + "gate_proj.weight"):  # GGUF: gate, up and down per expert, [out, in]
        w = {n: source.get(f"{split}{n}_proj.weight").float() for n in ("gate", "up", "down")}
        b = {n: source.get(f"{split}{n}_proj.bias").float() for n in ("gate", "up", "down")}
        return torch.cat([w["gate"], w["up"]]), torch.cat([b["gate"], b["up"]]), w["down"], b["down"]

    def matrix(name: str) -> torch.Tensor:  # [in, out] as transformers holds it
        if source.has(base + name):
            return source.get(base + name)[expert].float()
        if source.has(base + name + "_blocks"):
            from ..quant.mxfp4 import dequantize_expert

            # MXFP4 blocks are stored [out, in/32, 16]; dequantized [out, in] -> transpose
            return dequantize_expert(source.get(base + name + "_blocks")[expert],
                                     source.get(base + name + "_scales")[expert]).T
        raise CheckpointError(f"missing tensor {base + name!r} (or its MXFP4 _blocks/_scales)")

    def bias(name: str) -> torch.Tensor:
        if not source.has(base + name):
            raise CheckpointError(f"missing tensor {base + name!r} (needed by gpt_oss)")
        return source.get(base + name)[expert].float()

    gate_up = deinterleave(matrix("gate_up_proj")).T.contiguous()  # [2I, D]
    gate_up_bias = deinterleave(bias("gate_up_proj_bias"))  # [2I]
    down = matrix("down_proj").T.contiguous()  # [D, I]
    return gate_up, gate_up_bias, down, bias("down_proj_bias")


def expert_names(layer: int, num_experts: int) -> list[str]:
    """Every name a layer's experts may have: fused (float or MXFP4) or split per expert (GGUF)."""
    base = f"model.layers.{layer}.mlp.experts."
    mats = [f"{m}{s}" for m in ("gate_up_proj", "down_proj") for s in ("", "_blocks", "_scales")]
    split = [f"{e}.{p}_proj.{k}" for e in range(num_experts) for p in ("gate", "up", "down") for k in ("weight", "bias")]
    return [base + n for n in mats + ["gate_up_proj_bias", "down_proj_bias"] + split]


class GptOssBuilder(Builder):
    def attention(self, i: int) -> Attention:
        a, s = self.args, self.spec
        qkv = [s.attn(i, f"{p}_proj.weight") for p in "qkv"]
        qkv_bias = [s.attn(i, f"{p}_proj.bias") for p in "qkv"] if a.attention_bias else None
        o_bias = [s.attn(i, "o_proj.bias")] if a.o_bias else None
        window = a.sliding_window if a.layer_types[i] == "sliding_attention" else None
        return Attention(
            i, self.linear(qkv, qkv_bias), self.linear([s.attn(i, "o_proj.weight")], o_bias),
            a.num_heads, a.num_kv_heads, a.head_dim, window=window, sinks=self.tensor(s.attn(i, "sinks")),
        )

    def experts(self, i: int) -> list[ClampedSwiGLU]:
        # auto: MXFP4 (safetensors or GGUF) and other block formats stay as stored (BlockLinear)
        return [expert_module(self.args, *expert_linears(self.src, i, e, self.quant).values())
                for e in range(self.args.num_experts)]

    def moe(self, i: int, provider: ExpertProvider) -> MoEBlock:
        router = LogitTopKRouter(self.tensor(self.spec.moe(i, "router.weight")),
                                 self.tensor(self.spec.moe(i, "router.bias")), self.args.top_k)
        return MoEBlock(i, router, provider)  # type: ignore[arg-type]  # same call as TopKRouter


def block_expert(source, layer: int, expert: int) -> dict[str, BlockLinear] | None:
    """One expert at its stored precision, or None when it is stored as floats: GGUF block rows
    (gate and up rows concatenated into one gate_up), or the safetensors MXFP4 ``*_blocks`` /
    ``*_scales`` (gate/up rows de-interleaved, bytes shuffled into GGUF's MXFP4 layout)."""
    base = f"model.layers.{layer}.mlp.experts."
    split = f"{base}{expert}."
    get = getattr(source, "blocks", None)
    if get is not None and source.has(split + "gate_proj.weight"):
        rows = [get(f"{split}{p}_proj.weight") for p in ("gate", "up", "down")]
        if any(r is None or r[0] not in supported_qtypes() for r in rows):
            return None
        (qt, gate, d), (_, up, _), (_, down, inter) = rows
        bias = {p: source.get(f"{split}{p}_proj.bias").float() for p in ("gate", "up", "down")}
        return {"gate_up": BlockLinear(qt, torch.cat([gate, up]), d, torch.cat([bias["gate"], bias["up"]])),
                "down": BlockLinear(qt, down, inter, bias["down"])}
    if not source.has(base + "gate_up_proj_blocks"):
        return None
    blocks, scales = (source.get(base + f"gate_up_proj_{k}")[expert] for k in ("blocks", "scales"))
    gate_up_bias = deinterleave(source.get(base + "gate_up_proj_bias")[expert].float())
    gate_up = BlockLinear.from_mxfp4_safetensors(torch.cat([blocks[0::2], blocks[1::2]]),
                                                 torch.cat([scales[0::2], scales[1::2]]), gate_up_bias)
    down = BlockLinear.from_mxfp4_safetensors(source.get(base + "down_proj_blocks")[expert],
                                              source.get(base + "down_proj_scales")[expert],
                                              source.get(base + "down_proj_bias")[expert].float())
    return {"gate_up": gate_up, "down": down}


def expert_linears(source, layer: int, expert: int, quant: str) -> dict[str, QuantLinear | BlockLinear]:
    if quant == "auto" and (kept := block_expert(source, layer, expert)) is not None:
        return kept
    gate_up, gate_up_bias, down, down_bias = expert_tensors(source, layer, expert)
    mode = "fp32" if quant == "auto" else quant
    return {"gate_up": QuantLinear.from_float(gate_up, gate_up_bias, mode),
            "down": QuantLinear.from_float(down, down_bias, mode)}


def expert_module(args: ModelArgs, gate_up: QuantLinear | BlockLinear, down: QuantLinear | BlockLinear) -> ClampedSwiGLU:
    return ClampedSwiGLU(gate_up, down, args.swiglu_alpha, args.swiglu_limit)


@dataclass(frozen=True)
class GptOssSpec(ArchSpec):
    def expert_tensor_names(self, layer: int, num_experts: int) -> list[str]:
        return expert_names(layer, num_experts)

    def expert_linears(self, source: Any, layer: int, expert: int, quant: str) -> dict[str, Any]:
        return expert_linears(source, layer, expert, quant)

    def expert_module(self, args: ModelArgs) -> dict[str, Any] | None:
        return {"kind": "clamped_swiglu", "alpha": args.swiglu_alpha, "limit": args.swiglu_limit}

    def expert_layout(self, layer: int, expert: int, has: Any) -> list[tuple[list[str], list[str] | None]] | None:
        base = f"model.layers.{layer}.mlp.experts.{expert}."
        if not has(base + "gate_proj.weight"):
            return None  # fused gate_up (interleaved rows; MXFP4 bytes in another layout): needs a store
        name = lambda p, k: f"{base}{p}_proj.{k}"  # noqa: E731
        return [([name("gate", "weight"), name("up", "weight")], [name("gate", "bias"), name("up", "bias")]),
                ([name("down", "weight")], [name("down", "bias")])]


def gguf_config(meta: Meta, shapes: Shapes) -> dict:
    config = base_config("gpt-oss", meta, shapes)
    moe = moe_config("gpt-oss", meta, shapes, "experts.0.gate_proj.weight")
    n = config["num_hidden_layers"]
    pattern = meta("gpt-oss.attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp's set_swa_pattern: layer i slides unless it is the last of each group of ``pattern``
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(n)]
    rope = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if meta("gpt-oss.rope.scaling.type", None) == "yarn":
        # OpenAI's reference (and transformers' gpt-oss config) do not truncate the YaRN ramp
        rope = {"rope_type": "yarn", "rope_theta": config["rope_theta"], "truncate": False,
                "factor": float(need(meta, "gpt-oss.rope.scaling.factor")),
                "original_max_position_embeddings": int(need(meta, "gpt-oss.rope.scaling.original_context_length")),
                "beta_fast": float(meta("gpt-oss.rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(meta("gpt-oss.rope.scaling.yarn_beta_slow", 1.0))}
    config.update(architectures=["GptOssForCausalLM"], num_local_experts=moe["num_experts"],
                  num_experts_per_tok=moe["num_experts_per_tok"], intermediate_size=moe["moe_intermediate_size"],
                  sliding_window=int(need(meta, "gpt-oss.attention.sliding_window")),
                  layer_types=["sliding_attention" if s else "full_attention" for s in sliding[:n]],
                  attention_bias=True, rope_parameters=rope, rope_scaling=None,
                  swiglu_limit=DEFAULT_LIMIT)  # llama.cpp's SWIGLU_OAI_MOE: alpha 1.702, limit 7 (no metadata key)
    return config


GGUF_BLOCK = moe_block({
    "post_attention_norm": "post_attention_layernorm",
    "attn_sinks.weight": "self_attn.sinks",
}, router="mlp.router", attn={k: v for k, v in ATTN.items() if not k.startswith("ffn_")})
GGUF = GGUFSpec("gpt-oss", "gpt_oss", GGUF_BLOCK, gguf_config)
ARCH = GptOssSpec("gpt_oss", args_from_config, builder=GptOssBuilder, gguf=GGUF,
                  shape=lambda args, cfg, name: standard_shape(args, name, expert_bias=True, router_bias=True, sinks=True))
