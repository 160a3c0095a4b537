"""How each benchmarked architecture's published HF checkpoints lay out one MoE layer's experts,
for benchkit/synth/hf.py: the shard header entries, the tensors streamed into them, and the way back
(from a checkpoint file or a loaded transformers model) to the store's terms.

The store's terms, per expert, fp32, in moemesh's orientation: ``gate_proj`` [I, D], ``up_proj``
[I, D], ``down_proj`` [D, I] and, for gpt-oss, ``gate_proj_bias`` [I], ``up_proj_bias`` [I],
``down_proj_bias`` [D]. The store packs gate_up as [gate rows; up rows] (GatedMLP and
ClampedSwiGLU both ``chunk(2)``), so gate is the first half of the rows.

* qwen3_moe, deepseek_v3: one tensor per expert and part,
  ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` (transformers 5 merges them into
  ``experts.gate_up_proj`` [E, 2I, D] and ``experts.down_proj`` [E, D, I] at load).
* mixtral: ``model.layers.L.block_sparse_moe.experts.E.w1`` (gate), ``w2`` (down), ``w3`` (up);
  transformers 5 renames block_sparse_moe to mlp and merges like the above.
* gpt_oss: fused per layer, as transformers 5 holds and saves them (the published bf16 conversions
  use the same names; the original checkpoints hold MXFP4 ``*_blocks``/``*_scales``, which cannot
  represent these weights): ``mlp.experts.gate_up_proj`` [E, D, 2I] with gate at even and up at odd
  columns, ``gate_up_proj_bias`` [E, 2I] interleaved the same way, ``down_proj`` [E, I, D] and
  ``down_proj_bias`` [E, D]. Written one expert slice at a time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Spec = list[tuple[str, torch.dtype, list[int]]]
Getter = Callable[[str], torch.Tensor]  # tensor name -> tensor (a checkpoint file or a model's parameters)
PARTS = ("gate_proj", "up_proj", "down_proj")
BIASES = ("gate_proj_bias", "up_proj_bias", "down_proj_bias")


def store_expert(store, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert in the store's terms, fp32, exactly the weights (and biases) moemesh uses."""
    mlp = store.read_expert(layer, expert)
    gu = mlp.gate_up.dequantized_weight()  # [2I, D] fp32: gate rows then up rows
    inter = gu.shape[0] // 2
    out = {"gate_proj": gu[:inter], "up_proj": gu[inter:], "down_proj": mlp.down.dequantized_weight()}
    if mlp.gate_up.bias is not None:
        b = mlp.gate_up.bias.float()
        out.update(gate_proj_bias=b[:inter], up_proj_bias=b[inter:], down_proj_bias=mlp.down.bias.float())
    return out


def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [I, ...] -> [2I, ...] with gate at even, up at odd positions (gpt-oss's fused order)."""
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


@dataclass(frozen=True)
class PerExpert:
    """One tensor per (expert, part); ``names`` maps the store's part to the checkpoint's."""

    prefix: str  # after "model.layers.L."
    names: tuple[tuple[str, str], ...]  # (store part, checkpoint part) in the checkpoint's order

    def name(self, layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.{self.prefix}.{expert}.{dict(self.names)[part]}.weight"

    def spec(self, layer: int, n_exp: int, d: int, inter: int) -> Spec:
        shape = {"gate_proj": [inter, d], "up_proj": [inter, d], "down_proj": [d, inter]}
        return [(self.name(layer, e, p), torch.float32, shape[p]) for e in range(n_exp) for p, _ in self.names]

    def produce(self, store, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        for e in range(store.num_experts):  # one expert dequantized at a time
            t = store_expert(store, layer, e)
            for p, _ in self.names:
                yield self.name(layer, e, p), t[p]

    def from_checkpoint(self, get: Getter, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {p: get(self.name(layer, expert, p)) for p, _ in self.names}

    def from_model(self, hf, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """transformers 5 merges the per-expert tensors into gate_up_proj [E, 2I, D] (gate rows
        then up) and down_proj [E, D, I] under ``mlp.experts``; 4.x keeps per-expert modules."""
        ex = hf.model.layers[layer].mlp.experts
        if hasattr(ex, "gate_up_proj"):
            gu = ex.gate_up_proj[expert].detach()
            inter = gu.shape[0] // 2
            return {"gate_proj": gu[:inter], "up_proj": gu[inter:], "down_proj": ex.down_proj[expert].detach()}
        m = ex[expert]
        return {p: getattr(m, c).weight.detach() for p, c in self.names}


@dataclass(frozen=True)
class GptOssFused:
    """The layer's experts as four fused tensors, gate/up interleaved, with biases."""

    def names(self, layer: int) -> dict[str, str]:
        base = f"model.layers.{layer}.mlp.experts."
        return {k: base + k for k in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}

    def spec(self, layer: int, n_exp: int, d: int, inter: int) -> Spec:
        n = self.names(layer)
        return [(n["gate_up_proj"], torch.float32, [n_exp, d, 2 * inter]),
                (n["gate_up_proj_bias"], torch.float32, [n_exp, 2 * inter]),
                (n["down_proj"], torch.float32, [n_exp, inter, d]),
                (n["down_proj_bias"], torch.float32, [n_exp, d])]

    def produce(self, store, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Expert slices [1, ...] of each fused tensor in turn: every expert is read twice (once for
        gate_up, once for down), the small biases are kept from the first pass."""
        n = self.names(layer)
        gu_bias, down_bias = [], []
        for e in range(store.num_experts):
            t = store_expert(store, layer, e)
            gu_bias.append(interleave(t["gate_proj_bias"], t["up_proj_bias"]))
            down_bias.append(t["down_proj_bias"])
            yield n["gate_up_proj"], interleave(t["gate_proj"], t["up_proj"]).T.unsqueeze(0)  # [1, D, 2I]
        yield n["gate_up_proj_bias"], torch.stack(gu_bias)
        for e in range(store.num_experts):
            yield n["down_proj"], store_expert(store, layer, e)["down_proj"].T.unsqueeze(0)  # [1, I, D]
        yield n["down_proj_bias"], torch.stack(down_bias)

    def from_checkpoint(self, get: Getter, layer: int, expert: int) -> dict[str, torch.Tensor]:
        n = self.names(layer)
        gu, gub = get(n["gate_up_proj"])[expert], get(n["gate_up_proj_bias"])[expert]  # [D, 2I], [2I]
        return {"gate_proj": gu[:, ::2].T, "up_proj": gu[:, 1::2].T, "down_proj": get(n["down_proj"])[expert].T,
                "gate_proj_bias": gub[::2], "up_proj_bias": gub[1::2], "down_proj_bias": get(n["down_proj_bias"])[expert]}

    def from_model(self, hf, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.from_checkpoint(lambda name: hf.get_parameter(name).detach(), layer, expert)


QWEN_NAMES = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))
LAYOUTS: dict[str, PerExpert | GptOssFused] = {
    "qwen3_moe": PerExpert("mlp.experts", QWEN_NAMES),
    "deepseek_v3": PerExpert("mlp.experts", QWEN_NAMES),
    "mixtral": PerExpert("block_sparse_moe.experts", (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))),
    "gpt_oss": GptOssFused(),
}


def layout(model_type: str) -> PerExpert | GptOssFused:
    if model_type not in LAYOUTS:
        raise SystemExit(f"synth_hf: no HF expert layout for model_type {model_type!r} (have {sorted(LAYOUTS)})")
    return LAYOUTS[model_type]
