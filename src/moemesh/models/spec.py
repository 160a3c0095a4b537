"""ArchSpec: what distinguishes one HF model_type from another, for the shared builder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .args import ModelArgs


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    args_from_config: Callable[[dict[str, Any]], ModelArgs]
    moe_prefix: str = "mlp"  # mixtral: "block_sparse_moe"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # mixtral: w1, w3, w2

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
