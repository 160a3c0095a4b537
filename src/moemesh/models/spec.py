"""ArchSpec: what distinguishes one HF model_type from another, for the shared builder."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .args import ModelArgs
from .shape import ModelShape, standard_shape


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    args_from_config: Callable[[dict[str, Any]], ModelArgs]
    moe_prefix: str = "mlp"  # mixtral: "block_sparse_moe"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # mixtral: w1, w3, w2
    # the model's linears and small tensors for `plan` (args, config, display name): most families are
    # standard_shape with their particulars; MLA families bring their own
    shape: Callable[[ModelArgs, dict[str, Any], str], ModelShape] = lambda args, cfg, name: standard_shape(args, name)
    builder: Any = None  # a models.build.Builder subclass when the shared Builder cannot build it (models.build.make_builder)
    gguf: Any = None  # its models.gguf.GGUFSpec when llama.cpp writes this family as a GGUF
    shared_name: str = "shared_expert"  # the shared expert's module name (DeepSeek, GLM: "shared_experts")
    router_bias: str = "gate.e_score_correction_bias"  # sigmoid routers' bias, under moe(); MiniMax: beside the gate
    # multimodal checkpoints nest the text model: (canonical prefix, stored prefix) pairs (weights/source.AliasedSource)
    aliases: tuple[tuple[str, str], ...] = ()
    # image input: (config, source, checkpoint dir) -> an object with prepare(ids, images) (models/qwen3_5_vision.ImageInput) or None
    images: Callable[[dict[str, Any], Any, Any], Any] | None = None

    def source(self, source: Any) -> Any:
        """``source`` seen under canonical HF names (model.layers..., lm_head...) when this family's
        checkpoints store them under other prefixes; idempotent."""
        from ..weights.source import AliasedSource

        if not self.aliases or isinstance(source, AliasedSource):
            return source
        return AliasedSource(source, self.aliases)

    def expert_tensor_names(self, layer: int, num_experts: int) -> list[str]:
        """HF tensor names holding one layer's experts (an expert store keeps them out of its trunk)."""
        return [n for e in range(num_experts) for n in self.expert(layer, e)]

    def expert_linears(self, source: Any, layer: int, expert: int, quant: str) -> dict[str, Any] | None:
        """One expert as the expert store keeps it ({"gate_up": QuantLinear, "down": QuantLinear})
        for architectures whose experts are not the three tensors ``expert`` names; None: those
        (experts/convert.py reads them)."""
        return None

    def expert_module(self, args: ModelArgs) -> dict[str, Any] | None:
        """What the store needs to rebuild an expert that is not a plain GatedMLP (None: GatedMLP)."""
        return None

    def expert_layout(self, layer: int, expert: int, has: Any) -> list[tuple[list[str], list[str] | None]] | None:
        """One expert's linears as (weight names whose rows are concatenated, their bias names or None),
        gate_up first, then down; None when the checkpoint holds them in a form that cannot be used in
        place (lazy experts then need an expert store). ``has(name)``: whether the checkpoint has it."""
        gate, up, down = self.expert(layer, expert)
        return [([gate, up], None), ([down], None)]

    def attn(self, layer: int, name: str) -> str:
        return f"model.layers.{layer}.self_attn.{name}"

    def dense_mlp(self, layer: int, name: str) -> str:
        return f"model.layers.{layer}.mlp.{name}"

    def moe(self, layer: int, name: str) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.{name}"

    def expert(self, layer: int, expert: int) -> tuple[str, str, str]:
        """HF names of one expert's (gate, up, down) weights."""
        base = f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}."
        return tuple(f"{base}{n}.weight" for n in self.expert_names)  # type: ignore[return-value]
