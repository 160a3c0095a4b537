"""Build a model whose experts are resident (read once) or lazy under a --ram budget, read from an
ExpertSource: an expert store, or the model's own file (loading/file_experts.py)."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..experts.budget import BudgetPlan, plan_budget
from ..experts.cache import ExpertCache
from ..experts.io import BlobReader
from ..experts.lazy import LazyExperts, Lookahead, RankGate
from ..experts.policy import make_policy
from ..experts.provider import ResidentExperts
from ..layers.moe import ExpertProvider, MoEBlock
from ..models import get_arch
from ..models.build import make_builder
from ..models.transformer import Transformer
from ..quant.hugepages import HugePageArena, arena_size
from ..store.expert_source import ExpertSource
from ..store.expert_store import ExpertStore
from ..weights.safetensors_io import SafetensorsCheckpoint
from ..weights.source import SafetensorsSource
from .placement import place_decode_weights

# Measured (bench/lazy_profile.py --prefetch-threshold, docs in RankGate): 0.7 prefetched 6 of 8 ranks on the
# Qwen3-shaped store at a quarter cap (4.6-4.8 vs 3.9-4.3 tok/s for all) and 27 of 28 on the moefied SmolLM2.
PREFETCH_THRESHOLD = 0.7


@dataclass
class ExpertOptions:
    ram: int | None = None  # whole-process budget in bytes; None = every expert resident
    policy: str = "lfu"
    verify: bool = True  # checksum of every blob read (xxh3-64; crc32 in older stores)
    prefetch: bool = True
    prefetch_top: int | None = None  # prefetch only each token's N most likely next-layer experts
    # prefetch a prediction rank only while its measured precision is at least this (lazy.RankGate); 0 = all
    prefetch_threshold: float = PREFETCH_THRESHOLD
    io_threads: int = 4
    direct: bool = True  # O_DIRECT when the filesystem allows it
    kv_reserve: int = 64 * 2**20
    prefix_cache: int | None = 0  # bytes of --ram for the prefix cache (None: experts/budget.auto_prefix_bytes)
    slots: int | None = None  # exact slot count (tests, benchmarks); overrides the budget


def model_bytes(model: Transformer, embed_resident: bool = False) -> int:
    """Bytes of the trunk that stay resident while decoding (experts behind a provider are not
    modules), BlockLinears' raw rows included. The embedding table (and a head's exact table when
    a quantized head scores every row) is an mmap view of which only a few rows per token are
    touched: not counted then, unless ``embed_resident`` (a table decoded at load, e.g. a GGUF's)."""
    seen, total = set(), 0
    tables = [] if model.lm_head.approx is not None else [model.lm_head.weight]
    tables += [model.embed] if embed_resident and isinstance(model.embed, torch.Tensor) else []
    raws = [m.raw for m in model.modules() if isinstance(getattr(m, "raw", None), torch.Tensor)]
    for t in list(model.parameters()) + list(model.buffers()) + tables + raws:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def lookaheads(model: Transformer, top: int | None = None) -> dict[int, Lookahead]:
    """layer l -> predictor of the next MoE layer's experts (consecutive MoE layers only)."""
    moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoEBlock)]
    out = {}
    for cur, nxt in zip(moe, moe[1:]):
        w_cur = model.layers[cur].ffn_norm.weight
        w_next = model.layers[nxt].ffn_norm.weight
        ratio = torch.where(w_cur.abs() > 1e-6, w_next / w_cur, torch.zeros_like(w_cur))  # [D]
        out[cur] = Lookahead(nxt, ratio, model.layers[nxt].ffn.router, top)
    return out


def resident_from_store(store: ExpertStore, num_experts: int, verify: bool, threads: int = 4) -> ResidentExperts:
    """Every expert of the store read into one huge-page arena (hugepages.py: the fused kernels
    stream them every token), ``threads`` reads in flight (file reads release the GIL: page-cache
    copies on several cores, or a disk queue deeper than one)."""
    arena = HugePageArena(arena_size([store.blob_size] * (num_experts * len(store.moe_layers))))
    slots = [(i, e, arena.take(store.blob_size)) for i in store.moe_layers for e in range(num_experts)]  # in order
    with ThreadPoolExecutor(max_workers=threads) as pool:
        modules = list(pool.map(lambda s: store.read_expert(s[0], s[1], verify, into=s[2]), slots))
    return ResidentExperts({i: modules[k * num_experts : (k + 1) * num_experts] for k, i in enumerate(store.moe_layers)})


def build_from_store(store: ExpertStore, quant: str, opts: ExpertOptions) -> tuple[Transformer, ExpertProvider, BudgetPlan | None]:
    spec = get_arch(store.config["model_type"])
    args = spec.args_from_config(store.config)
    source = SafetensorsSource(SafetensorsCheckpoint(store.root))
    builder = make_builder(spec, args, source, quant, trunk_of=store.root)
    if opts.ram is None and opts.slots is None:
        provider = ResidentExperts({})  # filled below: the build never touches experts
        with ThreadPoolExecutor(max_workers=1) as pool:  # the experts stream in while the trunk builds (or converts)
            reading = pool.submit(resident_from_store, store, args.num_experts, opts.verify)
            model = builder.build(provider)
            provider.experts = reading.result().experts
        place_decode_weights(model, move_experts=False, release=source.release_view)  # experts already in their arena
        source.ckpt.release_unused(model)
        return model, provider, None
    return build_lazy(builder, store, opts, source.ckpt.release_unused)


def build_lazy(builder, experts: ExpertSource, opts: ExpertOptions, release: Callable[[Transformer], object],
               embed_resident: bool = False) -> tuple[Transformer, LazyExperts, BudgetPlan | None]:
    """The trunk from ``builder``; the experts read on demand from ``experts`` into a cache sized by
    ``opts`` (its slots, or what --ram leaves after the trunk). ``release(model)`` gives back the
    trunk's file pages that only the load read."""
    args = builder.args
    lazy = LazyExperts(cache=None)  # type: ignore[arg-type]  # the cache is sized after the trunk
    model = builder.build(lazy)
    place_decode_weights(model)  # the trunk (lazy experts live in the cache's slots)
    release(model)  # trunk pages only the load read (float weights now quantized, tables)
    plan = None
    slots = opts.slots
    if slots is None:
        # a hybrid model's recurrent state is a fixed size per sequence (Qwen3.5-397B: ~180 MiB): one sequence's is reserved
        reserve = opts.kv_reserve + args.recurrent_state_bytes()
        plan = plan_budget(opts.ram, model_bytes(model, embed_resident), reserve, experts.slot_bytes, args.top_k,
                           opts.prefix_cache, args.num_experts * len(experts.moe_layers))
        slots = plan.slots
    slots = min(slots, args.num_experts * len(experts.moe_layers))
    reader = BlobReader(experts.files, opts.io_threads, opts.direct)
    lazy.cache = ExpertCache(experts, slots, make_policy(opts.policy), reader, opts.verify)
    lazy.cache.min_slots = min(slots, args.top_k)
    if plan is not None:  # under --ram: working memory past the reserve is lent by the cache (engine/memory.py)
        lazy.cache.reserve_bytes = plan.kv_reserve + max(0, plan.slots - slots) * experts.slot_bytes
        lazy.cache.prefix_bytes = plan.prefix_cache
    if opts.prefetch:
        lazy.lookahead = lookaheads(model, opts.prefetch_top)
        lazy.gate = RankGate(opts.prefetch_threshold)
    return model, lazy, plan
