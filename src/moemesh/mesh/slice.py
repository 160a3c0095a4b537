"""A pipeline stage's share of a model: decoder layers [start, end), and the ends (embedding,
final norm, head) only on a node that serves the API.

Only the slice's tensors are read (the Builder reads weights by name, lazily). Attention layer
indices are renumbered to 0..n-1 so the stage's KV cache holds n layers, not the whole model's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..batch import BatchLayout
from ..errors import CheckpointError
from ..experts.provider import ResidentExperts
from ..kvcache.base import KVCache
from ..layers.head import OutputHead
from ..layers.norm import RMSNorm
from ..layers.rope import make_rotary
from ..loading.source import arch_and_args, open_source, resolve_model_path
from ..models.args import ModelArgs
from ..models.build import Builder, make_builder
from ..models.transformer import DecoderLayer, model_cache


class StageLayers(torch.nn.Module):
    """Runs decoder layers [start, end) over the residual stream: x [T, D] -> x [T, D]."""

    def __init__(self, args: ModelArgs, start: int, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.args, self.start, self.end = args, start, start + len(layers)
        self.layers = torch.nn.ModuleList(layers)
        for i, layer in enumerate(layers, start):
            # the stage's cache holds only these layers (hybrid models number attention and linear layers apart)
            layer.attn.layer = sum(args.is_linear_layer(j) == args.is_linear_layer(i) for j in range(start, i))
        indexers = [ix for layer in layers if (ix := getattr(layer.attn, "indexer", None)) is not None]
        for local, ix in enumerate(indexers):  # sparse attention (glm_moe_dsa): the stage's indexer keys
            ix.layer = local
        self.rope = make_rotary(args.rope_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings,
                                args.mrope_section)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, batch: BatchLayout) -> torch.Tensor:
        # x: [T, D] fp32, positions: [T]
        cos, sin = self.rope.cos_sin(positions)
        cache.begin(batch)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, batch)
        cache.end(batch)
        return x

    def new_cache(self, kv: str = "dense") -> KVCache:
        return model_cache(self.args, kv, list(self.layers))  # MLA: the latent; hybrid: + recurrent states


@dataclass
class Ends:
    """What only the API node needs: token embedding [V, D], final norm, output head."""

    embed: torch.Tensor
    norm: RMSNorm
    head: OutputHead


@dataclass
class LoadedSlice:
    args: ModelArgs
    stage: StageLayers
    ends: Ends | None
    tokenizer: object | None
    config: dict
    experts: dict[int, dict[int, torch.nn.Module]] = field(default_factory=dict)  # layer -> expert id -> module
    held: list[int] | None = None  # expert ids held in every MoE layer (None: all of them)


# (args, config, bytes of one expert id over the slice's MoE layers) -> expert ids to hold
ExpertChoice = Callable[[ModelArgs, dict, int], list[int]]


def module_bytes(m: torch.nn.Module) -> int:
    if hasattr(m, "nbytes"):
        return int(m.nbytes())
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def _build_experts(builder: Builder, layer: int, held: list[int]) -> dict[int, torch.nn.Module]:
    if type(builder) is Builder:  # plain three-tensor experts: build only the held ones
        return {e: builder.gated_mlp(*builder.spec.expert(layer, e)) for e in held}
    every = builder.experts(layer)  # custom builders (gpt-oss) build a layer's experts together
    return {e: every[e] for e in held}


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    """"A:B" (either side may be empty) -> (A, B) within [0, num_layers]; ValueError otherwise."""
    a, sep, b = text.partition(":")
    if not sep:
        raise ValueError(f"--layers must look like A:B, got {text!r}")
    try:
        start = int(a) if a.strip() else 0
        end = int(b) if b.strip() else num_layers
    except ValueError:
        raise ValueError(f"--layers must look like A:B with integers, got {text!r}") from None
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"--layers {text}: need 0 <= A < B <= {num_layers} (the model has {num_layers} layers)")
    return start, end


def load_slice(name: str, layers: str | None, quant: str = "auto", with_ends: bool = True,
               choose_experts: ExpertChoice | None = None) -> LoadedSlice:
    """Load layers ``A:B`` of a checkpoint (all when None) plus the ends if ``with_ends``.
    ``choose_experts`` (expert-shard mode) picks the expert ids to hold once the trunk is built
    (so ``auto`` sees the memory left); None holds every expert."""
    path = resolve_model_path(name)
    from ..store.expert_store import is_store

    if path.is_dir() and is_store(path):
        raise CheckpointError(f"{path}: mesh stages do not load expert stores yet; pass the HF directory or GGUF")
    config, source, tokenizer = open_source(path)
    spec, args = arch_and_args(path, config)
    start, end = parse_layers(layers or ":", args.num_layers)
    builder = make_builder(spec, args, source, quant)  # an architecture may bring its own (gpt_oss)
    experts: dict[int, dict[int, torch.nn.Module]] = {}
    provider = ResidentExperts(experts)  # filled below; the MoE blocks keep this reference
    stage = StageLayers(args, start, [builder.layer(i, provider) for i in range(start, end)])
    ends = None
    if with_ends:
        embed = builder.tensor("model.embed_tokens.weight")  # [V, D]
        ends = Ends(embed, builder.norm("model.norm.weight"), builder.head(embed))
    moe = [i for i in args.moe_layers if start <= i < end]
    held: list[int] | None = None
    if choose_experts is not None and moe:
        one = _build_experts(builder, moe[0], [0])[0]
        held = sorted(set(choose_experts(args, config, module_bytes(one) * len(moe))))
        del one
    for i in moe:
        experts[i] = _build_experts(builder, i, list(range(args.num_experts)) if held is None else held)
    return LoadedSlice(args, stage, ends, tokenizer, config, experts, held)
