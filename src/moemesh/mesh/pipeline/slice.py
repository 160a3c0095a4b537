"""A mesh node's share of a model: the decoder layers it built, the experts it computes, and the
ends (embedding, final norm, head) on a node that serves the API.

Two kinds of node:

- **fixed** (an explicit ``--layers A:B`` or ``--experts`` list, no ``--ram``): builds only layers
  [A, B) and, in expert-shard mode, only the held experts, resident. It serves exactly that share;
  only a replica of the same share can take over from it.
- **elastic** (``--ram SIZE``, or no range given): the whole model, built the way ``moemesh
  generate`` builds it (``loading.load_model``): every layer's trunk resident and, with ``--ram``,
  the experts streamed from this node's own expert store into a RAM-budgeted cache. It can run any
  layer range and any expert, so a plan may give it any share (and a dead node's share); its cache
  holds the experts of the share it is given, because those are the only ones it is asked for.
  The price: every layer's trunk (attention, norms, routers) on every node, counted in ``--ram``.

Decoder layers keep their numbers; a range's cache is built over its layers (numbered per kind from
0) and seen through a RangeCache that maps each layer's number to it (range_cache.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...batch import BatchLayout
from ...engine.decode_range import PlannedRange
from ...errors import CheckpointError
from ...experts.budget import BudgetPlan
from ...experts.lazy import LazyExperts
from ...experts.mixing import GroupedProvider
from ...experts.provider import ResidentExperts
from ...kvcache.base import KVCache
from ...layers.head import OutputHead
from ...layers.moe import MoEBlock
from ...layers.norm import RMSNorm
from ...layers.rope import make_rotary
from ...loading.experts import ExpertOptions
from ...loading.loader import load_model
from ...loading.source import arch_and_args, open_source, resolve_model_path
from ...models.args import ModelArgs
from ...models.build import Builder, make_builder
from ...models.transformer import DecoderLayer, model_cache
from ...store.expert_store import ExpertStore, is_store
from ...weights.safetensors_io import SafetensorsCheckpoint
from ...weights.source import SafetensorsSource
from .range_cache import RangeCache, range_offsets
from .serial import SerialExperts


class StageLayers(torch.nn.Module):
    """Decoder layers by global index; runs any built range [a, b) over the residual stream x [T, D]."""

    def __init__(self, args: ModelArgs, layers: dict[int, DecoderLayer], start: int, end: int) -> None:
        super().__init__()
        self.args, self.start, self.end = args, start, end  # the share it was started with
        self.layers = torch.nn.ModuleList([layers[i] for i in sorted(layers)])
        self.index = dict(sorted(layers.items()))  # global layer -> module (the same modules)
        self.rope = make_rotary(args.rope_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings,
                                args.mrope_section)
        self._planned: PlannedRange | None = None  # decode tokens' C calls, built on first use (weights placed)

    def covers(self, a: int, b: int) -> bool:
        return all(i in self.index for i in range(a, b))

    @torch.inference_mode()
    def run(self, a: int, b: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
            batch: BatchLayout) -> torch.Tensor:
        """Layers [a, b): x [T, D] fp32, positions [T] -> [T, D]; ``cache`` holds b - a layers."""
        if not self.covers(a, b):
            raise ValueError(f"layers {a}:{b} are not built on this node (it holds {self.start}:{self.end})")
        first = self.index[a].attn
        if hasattr(first, "indexer") and first.indexer is None:
            raise ValueError(f"layers {a}:{b}: layer {a} reuses the sparse-attention pick of layer {a - 1}, so a "
                             "stage cannot start there (start it at a layer with its own indexer)")
        cos, sin = self.rope.cos_sin(positions)
        offsets = range_offsets([self.index[i] for i in range(a, b)])
        kv = RangeCache(cache, offsets)
        kv.begin(batch)
        planned = self.planned()
        if planned.takes(a, b, x, batch, cache):  # one decode token: the planned per-layer C calls
            x = planned.run(a, b, x, cos, sin, cache, offsets.get("attn", 0), batch.seq_ids[0])  # type: ignore[arg-type]
        else:
            for i in range(a, b):
                x = self.index[i](x, cos, sin, kv, batch)
        kv.end(batch)
        return x

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, batch: BatchLayout) -> torch.Tensor:
        return self.run(self.start, self.end, x, positions, cache, batch)

    def planned(self) -> PlannedRange:
        if self._planned is None:
            rotary = self.rope.cos_sin(torch.zeros(1, dtype=torch.long))[0].shape[-1]
            self._planned = PlannedRange(self.index, rotary)
        return self._planned

    def new_cache(self, kv: str = "dense", a: int | None = None, b: int | None = None) -> KVCache:
        """The cache for layers [a, b) (default: the start share), numbered per kind from 0 as a whole
        model's is (a HybridCache for linear-attention layers, an IndexedCache for indexers; MLA: the latent)."""
        a = self.start if a is None else a
        b = self.end if b is None else b
        if not self.covers(a, b):
            raise ValueError(f"layers {a}:{b} are not built on this node (it holds {self.start}:{self.end})")
        return model_cache(self.args, kv, [self.index[i] for i in range(a, b)])


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
    path: Path
    provider: GroupedProvider | None = None  # computes this node's experts (resident or lazy); None: dense
    held: list[int] | None = None  # fixed expert-shard share (ids in every MoE layer); None: any / all
    elastic: bool = False  # every layer and every expert available here: a plan may give it any share
    budget: BudgetPlan | None = None  # the --ram split (lazy experts)
    experts: dict[int, dict[int, torch.nn.Module]] = field(default_factory=dict)  # fixed shards' held modules

    @property
    def lazy_experts(self) -> LazyExperts | None:
        """The expert cache behind ``provider`` (elastic nodes with --ram), for stats and prefetch filters."""
        return self.provider.lazy if isinstance(self.provider, SerialExperts) else None


# (args, config, bytes of one expert id over the slice's MoE layers) -> expert ids to hold
ExpertChoice = Callable[[ModelArgs, dict, int], list[int]]


def module_bytes(m: torch.nn.Module) -> int:
    if hasattr(m, "nbytes"):
        return int(m.nbytes())
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    """"A:B" (either side may be empty) -> (A, B) within [0, num_layers]; ValueError otherwise."""
    a, sep, b = text.partition(":")
    if not sep:
        raise ValueError(f"--layers must look like A:B or auto, got {text!r}")
    try:
        start = int(a) if a.strip() else 0
        end = int(b) if b.strip() else num_layers
    except ValueError:
        raise ValueError(f"--layers must look like A:B with integers, got {text!r}") from None
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"--layers {text}: need 0 <= A < B <= {num_layers} (the model has {num_layers} layers)")
    return start, end


def load_slice(name: str, layers: str | None, quant: str = "auto", with_ends: bool = True,
               choose_experts: ExpertChoice | None = None, experts: ExpertOptions | None = None) -> LoadedSlice:
    """Load this node's share. ``layers``: "A:B", "auto" or None (every layer). ``experts`` with a
    budget (``ram`` or ``slots``): elastic, lazy experts. ``choose_experts`` (expert-shard mode)
    picks the ids a fixed node holds once its trunk is built, so ``auto`` sees the memory left."""
    lazy = experts is not None and (experts.ram is not None or experts.slots is not None)
    if lazy:
        return _load_elastic(name, layers, quant, experts)
    path = resolve_model_path(name)
    store = ExpertStore(path) if path.is_dir() and is_store(path) else None
    if store is not None:
        config, tokenizer = store.config, _store_tokenizer(path)
        source = SafetensorsSource(SafetensorsCheckpoint(store.root))
    else:
        config, source, tokenizer = open_source(path)
    spec, args = arch_and_args(path, config)
    start, end = (0, args.num_layers) if layers in (None, "auto") else parse_layers(layers, args.num_layers)
    builder = make_builder(spec, args, source, quant)  # an architecture may bring its own (gpt_oss)
    held_modules: dict[int, dict[int, torch.nn.Module]] = {}
    provider = ResidentExperts(held_modules)  # filled below; the MoE blocks keep this reference
    built = {i: builder.layer(i, provider) for i in range(start, end)}
    ends = None
    if with_ends:
        embed = builder.tensor("model.embed_tokens.weight")  # [V, D]
        ends = Ends(embed, builder.norm("model.norm.weight"), builder.head(embed))
    moe = [i for i in args.moe_layers if start <= i < end]
    held: list[int] | None = None
    if choose_experts is not None and moe:
        one = _build_experts(builder, store, moe[0], [0])[0]
        held = sorted(set(choose_experts(args, config, module_bytes(one) * len(moe))))
        del one
    for i in moe:
        held_modules[i] = _build_experts(builder, store, i, list(range(args.num_experts)) if held is None else held)
    whole = (start, end) == (0, args.num_layers)
    return LoadedSlice(args, StageLayers(args, built, start, end), ends, tokenizer, config, path,
                       provider if moe else None, held, elastic=whole and held is None, experts=held_modules)


def _load_elastic(name: str, layers: str | None, quant: str, experts: ExpertOptions) -> LoadedSlice:
    """The whole model with lazy experts under the budget (an HF MoE directory becomes a cached store)."""
    path = resolve_model_path(name)
    if path.is_file():
        raise CheckpointError(f"{path}: --ram on a mesh node streams experts from an expert store; convert the "
                              "GGUF first (moemesh convert MODEL.gguf STORE) and serve the store")
    loaded = load_model(name, quant, experts=experts)
    m, args = loaded.model, loaded.args
    start, end = (0, args.num_layers) if layers in (None, "auto") else parse_layers(layers, args.num_layers)
    stage = StageLayers(args, dict(enumerate(m.layers)), start, end)
    provider = SerialExperts(loaded.provider) if isinstance(loaded.provider, GroupedProvider) else None
    for layer in m.layers:  # every thread of the node (engine, stage and expert servers) through one lock
        if isinstance(layer.ffn, MoEBlock):
            layer.ffn.provider = provider
    return LoadedSlice(args, stage, Ends(m.embed, m.norm, m.lm_head), loaded.tokenizer, loaded.config, loaded.path,
                       provider, None, elastic=True, budget=loaded.budget)


def _store_tokenizer(path: Path) -> object | None:
    if not (path / "tokenizer.json").is_file():
        return None
    from ...tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def _build_experts(builder: Builder, store: ExpertStore | None, layer: int, held: list[int]) -> dict[int, torch.nn.Module]:
    if store is not None:  # an expert store's blobs, read once (resident)
        return {e: store.read_expert(layer, e) for e in held}
    if type(builder) is Builder:  # plain three-tensor experts: build only the held ones
        return {e: builder.gated_mlp(*builder.spec.expert(layer, e)) for e in held}
    every = builder.experts(layer)  # custom builders (gpt-oss) build a layer's experts together
    return {e: every[e] for e in held}
