"""One decode token of one sequence through a run of decoder layers with decode_plan's per-layer C calls.

A mesh node runs a share of the layers (mesh/pipeline/slice.StageLayers), not a whole Transformer, so
the Engine's planned decode never reached it: its layers ran their modules' forward. Here each layer
the plan covers (decode_plan.plannable) is bound once to AttentionPlan / FfnPlan, and a single-sequence
decode token runs them: the same calls with the same arguments as the layers' forward, so the same bits
(tests/test_decode_range.py). 15 of SmolLM2's layers per token: 4.1-4.2 -> 2.7-3.1 ms on one thread; two
chained stages on loopback at 0 ms per hop 13.71 -> 12.36 ms per token. When the whole-model step covers
every layer of the range, the range is one C call (decode_step.StepTable with the range's cache offset):
12.36 -> 10.34 ms, three stages 13.93 -> 8.09 (bench/results/mesh.md). Anything else (prefill,
batches, explicit starts, other caches, a layer the plan does not cover) stays with the modules.
"""
from __future__ import annotations

import torch

from ..batch import BatchLayout
from ..kvcache.dense import DenseKVCache
from ..layers.norm import RMSNorm
from ..models.transformer import DecoderLayer
from ..quant import decode_kernels, int4_native
from .decode_plan import AttentionPlan, FfnPlan, plannable
from .decode_step import StepTable


class PlannedRange:
    """Plans for the layers of ``layers`` (global number -> layer) that decode_plan covers."""

    def __init__(self, layers: dict[int, DecoderLayer], rotary_dim: int) -> None:
        self.lib = decode_kernels.load()
        self.plans: dict[int, tuple[DecoderLayer, AttentionPlan, FfnPlan | None]] = {}
        self.tables: dict[tuple[int, int, int], StepTable | None] = {}  # (a, b, offset) -> the range's one C call
        if self.lib is None or int4_native.load_native() is None:
            return
        for i, layer in layers.items():
            if plannable(layer, rotary_dim):
                ffn = FfnPlan(layer, self.lib) if isinstance(layer.ffn_norm, RMSNorm) else None
                self.plans[i] = (layer, AttentionPlan(layer, i, self.lib), ffn)

    def takes(self, a: int, b: int, x: torch.Tensor, batch: BatchLayout, cache: object) -> bool:
        """Whether layers [a, b) run planned for this call: one token of one sequence at its next position
        (no explicit starts), every layer planned, the dense fp32 cache."""
        return (x.shape[0] == 1 and len(batch.seq_ids) == 1 and batch.starts is None and type(cache) is DenseKVCache
                and cache.dtype == torch.float32 and all(i in self.plans for i in range(a, b)))

    @torch.inference_mode()
    def run(self, a: int, b: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: DenseKVCache,
            offset: int, seq_id: int) -> torch.Tensor:
        """x [1, D] -> [1, D] through layers [a, b) for the token at the sequence's next position (after
        cache.begin, before cache.end); ``cache`` numbers its layers from ``offset`` (a range's cache)."""
        seq = cache.seqs[seq_id]
        pos, threads = seq.length, torch.get_num_threads()
        x = x.float().clone()  # [1, D]: the plans add into it, and it may be the caller's (or the wire's) row
        if (a, b, offset) not in self.tables:  # the range as one C call when the whole-model step covers it
            run = [self.plans[i] for i in range(a, b)]
            self.tables[(a, b, offset)] = StepTable.build([p[1] for p in run], [p[2] for p in run], self.lib,
                                                          x.shape[1], offset)
        if (table := self.tables[(a, b, offset)]) is not None:
            table.run(x, cos, sin, cache, seq_id, pos, threads)  # the same kernels and order: the same bits
            return x
        for i in range(a, b):
            layer, attn, ffn = self.plans[i]
            local = attn.attn.layer - offset
            keys = seq.keys[local]
            values = keys if cache.values_in_keys else seq.values[local]
            x = attn(x, cos, sin, keys, values, cache.value_dim, pos, threads)
            x = layer.ffn_block(x) if ffn is None else ffn(x, threads)
        return x
