"""qwen3_5_moe (Qwen3.5 MoE, e.g. Qwen3.5-397B-A17B): Qwen3-Next's hybrid text stack (DeltaNet
and gated attention layers, (1 + w) norms, shared expert) with every layer sparse, the DeltaNet
projections stored apart (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a: one fused linear here,
already in [q; k; v; z; b; a] order), and a vision tower beside it (``model.visual.*``).

The checkpoint nests the text model (``model.language_model.*``; ``ArchSpec.aliases``) and may
hold each layer's experts as two 3-D tensors (``mlp.experts.gate_up_proj`` [E, 2I, D],
``mlp.experts.down_proj`` [E, D, I]) or one tensor per expert (what transformers writes): both
are read. Text positions: Qwen3.5's M-RoPE gives every text token the same position on its three
axes, which is ordinary RoPE over the rotary dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.gated_deltanet import DeltaNetConfig
from ..layers.mlp import GatedMLP
from ..quant.qlinear import QuantLinear
from .args import ModelArgs
from .qwen3_5_vision import image_input
from .qwen3_next import HybridBuilder, hybrid_args, hybrid_shape
from .spec import ArchSpec


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("text_config") or cfg  # qwen3_5_moe nests it; qwen3_5_moe_text checkpoints are flat


def args_from_config(cfg: dict[str, Any]) -> ModelArgs:
    text = text_config(cfg)
    args = hybrid_args(text, "qwen3_5_moe", list(range(int(text["num_hidden_layers"]))))
    args.mrope_section = list((text.get("rope_parameters") or {}).get("mrope_section") or [11, 11, 10])
    args.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return args


def fused_names(layer: int) -> tuple[str, str]:
    base = f"model.layers.{layer}.mlp.experts."
    return base + "gate_up_proj", base + "down_proj"


def expert_linears(source, spec: ArchSpec, layer: int, expert: int, quant: str) -> dict[str, QuantLinear] | None:
    """One expert from the 3-D tensors when the checkpoint has them, else None (per-expert tensors)."""
    gate_up, down = fused_names(layer)
    if not source.has(gate_up):
        return None
    if not source.has(down):
        raise CheckpointError(f"{gate_up!r} without {down!r}")
    mode = "fp32" if quant == "auto" else quant
    return {"gate_up": QuantLinear.from_float(source.get(gate_up)[expert].float(), None, mode),  # [2I, D]: gate; up
            "down": QuantLinear.from_float(source.get(down)[expert].float(), None, mode)}  # [D, I]


class Qwen35Builder(HybridBuilder):
    def deltanet_in_proj(self, p: str, c: DeltaNetConfig) -> tuple[QuantLinear, torch.Tensor | None]:
        return self.linear([p + f"in_proj_{n}.weight" for n in ("qkv", "z", "b", "a")]), None

    def experts(self, i: int) -> list[GatedMLP]:
        if not self.src.has(fused_names(i)[0]):
            return super().experts(i)
        out = []
        for e in range(self.args.num_experts):
            lin = expert_linears(self.src, self.spec, i, e, self.quant)
            assert lin is not None
            out.append(GatedMLP(lin["gate_up"], lin["down"], self.args.hidden_act))
        return out


@dataclass(frozen=True)
class Qwen35Spec(ArchSpec):
    def expert_tensor_names(self, layer: int, num_experts: int) -> list[str]:
        return [*super().expert_tensor_names(layer, num_experts), *fused_names(layer)]

    def expert_linears(self, source: Any, layer: int, expert: int, quant: str) -> dict[str, Any] | None:
        return expert_linears(source, self, layer, expert, quant)


ALIASES = (("model.", "model.language_model."),)
ARCH = Qwen35Spec("qwen3_5_moe", args_from_config, builder=Qwen35Builder, aliases=ALIASES, shape=hybrid_shape,
                  images=image_input)
TEXT_ARCH = Qwen35Spec("qwen3_5_moe_text", args_from_config, builder=Qwen35Builder, aliases=ALIASES, shape=hybrid_shape)
