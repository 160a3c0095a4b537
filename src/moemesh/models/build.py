"""Build a Transformer straight from a WeightSource.

Modules are constructed from the loaded tensors (never randomly initialised first), so each
weight exists once: as an mmap view when it is used as stored, or only in its converted form.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..experts.provider import ResidentExperts
from ..layers.attention import Attention
from ..layers.grouped_router import GroupedRouter
from ..layers.head import OutputHead
from ..layers.mlp import GatedMLP
from ..layers.moe import ExpertProvider, MoEBlock
from ..layers.norm import RMSNorm
from ..layers.router import TopKRouter
from ..quant.block_table import BlockTable
from ..quant.blocks import BlockLinear, supported_qtypes
from ..quant.qlinear import QuantLinear
from ..quant.qlinear_rows import from_float_rows
from ..weights.source import WeightSource
from ..weights.trunk_cache import TrunkCache
from .args import ModelArgs
from .conversion import ConversionLog
from .spec import ArchSpec
from .transformer import DecoderLayer, Transformer

QUANT_MODES = ("auto", "fp32", "bf16", "int8", "int4")
TENSOR_TABLES = ("Q8_0", "Q4_0", "Q4_1")  # embedding/head formats decoded whole, as before BlockTable


def int4_head(stored: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> QuantLinear:
    """The head's int4 matmul from a store's packed table (packed, scale, zero), row chunk by row
    chunk: the same buffers as quantizing the float table at load."""
    from ..quant.int4_trunk import groups
    from ..quant.qlinear_rows import from_row_chunks

    packed, scale, zero = stored

    def chunk(a: int, b: int) -> QuantLinear:
        return QuantLinear.from_int4_groups(*groups(packed[a:b], scale[a:b], zero[a:b]), None)

    return from_row_chunks(packed.shape[0], chunk, "int4")


def make_builder(spec: ArchSpec, args: ModelArgs, source: WeightSource, quant: str = "auto",
                 trunk_of: Path | None = None) -> "Builder":
    """The architecture's own Builder subclass (spec.builder, e.g. gpt_oss) or the shared one.
    ``trunk_of``: the model's path, whose trunk cache (weights/trunk_cache.py) the build maps or fills."""
    builder = (spec.builder or Builder)(spec, args, spec.source(source), quant)
    builder.trunk = None if trunk_of is None else TrunkCache.for_model(trunk_of, quant)
    return builder


class Builder:
    """Turns HF-named tensors into layers. ``quant``: auto keeps each tensor as stored (GGUF Q4_0/Q4_1
    go straight into the int4 kernel, other block formats (K-quants, Q8_0, MXFP4 ...) become
    BlockLinears over their raw rows, floats become fp32); fp32/bf16/int8/int4 convert every linear,
    and ``conversion`` measures what that costs against the stored values."""

    def __init__(self, spec: ArchSpec, args: ModelArgs, source: WeightSource, quant: str = "auto") -> None:
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        self.spec, self.args, self.src, self.quant = spec, args, source, quant
        self.native_int4 = False  # set once a stored 4-bit tensor went straight into the kernel
        self.conversion = ConversionLog(quant)
        self.trunk: TrunkCache | None = None  # converted linears from an earlier load (make_builder's trunk_of)

    def tensor(self, name: str) -> torch.Tensor:
        if not self.src.has(name):
            raise CheckpointError(f"missing tensor {name!r} (needed by {self.args.model_type})")
        return self.src.get(name)

    def optional(self, name: str) -> torch.Tensor | None:
        return self.src.get(name) if self.src.has(name) else None

    def linear(self, names: list[str], bias_names: list[str] | None = None, expert: bool = False) -> QuantLinear | BlockLinear:
        """One linear from the row-wise concatenation of ``names`` (fuses q/k/v, gate/up). A routed
        expert (``expert``) stored in any block format stays a BlockLinear under auto, Q4_0/Q4_1
        included: the file's own rows, which lazy experts read straight from the file."""
        bias = None
        if bias_names:
            bias = torch.cat([self.tensor(b).float() for b in bias_names])
        if self.quant == "auto" and expert and (blocks := self.block_rows(names)) is not None:
            qtype, raws, k = blocks
            return BlockLinear(qtype, self._joined(raws), k, bias)
        if self.quant == "auto" and expert and all(self.stored_type(n) in ("BF16", "bfloat16") for n in names):
            w = torch.cat([self.tensor(n) for n in names]).to(torch.bfloat16)  # exact: bf16 values stay bf16
            return QuantLinear.from_float(w, bias, "bf16")  # as a bf16 store or lazy bf16 experts hold them
        key = None if expert else "+".join(names)  # routed experts: an expert store is their cache
        if self.quant in ("auto", "int4"):
            groups = [self.src.int4_groups(n) if self.src.has(n) else None for n in names]
            if all(g is not None for g in groups):
                self.native_int4 = True
                if (hit := self._cached(key)) is not None:
                    return hit
                layer = QuantLinear.from_int4_groups(*(torch.cat(parts) for parts in zip(*groups)), bias)
                return self._keep(key, layer)
        if self.quant == "auto" and (blocks := self.block_rows(names)) is not None:
            qtype, raws, k = blocks
            return BlockLinear(qtype, self._joined(raws), k, bias)  # gate + up: one copy
        if (hit := self._cached(key)) is not None:
            return hit
        weights = [self.tensor(n) for n in names]
        w = weights[0] if len(weights) == 1 else torch.cat(weights)  # [O, I]
        mode = "fp32" if self.quant == "auto" else self.quant
        layer = QuantLinear.from_float(w.float(), bias, mode)
        return self._keep(key, layer, self.conversion.record(self.stored_type(names[0]), w, layer))

    def _cached(self, key: str | None) -> QuantLinear | None:
        """A layer this load would convert, as an earlier load converted it (the trunk cache), or None."""
        if self.trunk is None or key is None or (layer := self.trunk.get(key)) is None:
            return None
        self.conversion.replay(self.trunk.conversion(key))
        return layer

    def _keep(self, key: str | None, layer: QuantLinear, recorded: list | None = None) -> QuantLinear:
        if self.trunk is not None and key is not None:
            self.trunk.put(key, layer, recorded)
        return layer

    def _joined(self, raws: list[torch.Tensor]) -> torch.Tensor:
        """The rows of ``raws`` as one tensor. Concatenating copies them, so the source's views are paged
        out right away (``release_view``): a resident whole model's gate + up rows would otherwise sit in
        RAM twice, as file pages and as the copy, until the load ends (10.9 GB of Qwen3-30B-A3B's)."""
        if len(raws) == 1:
            return raws[0]
        out = torch.cat(raws)  # uint8 [sum of rows, row_bytes]
        release = getattr(self.src, "release_view", None)
        if release is not None:
            for r in raws:
                release(r)
        return out

    def block_rows(self, names: list[str]) -> tuple[str, list[torch.Tensor], int] | None:
        """(qtype, raw rows of each name, in_features) when every name is stored in one block format
        BlockLinear computes (GGUF K-quants, Q8_0, MXFP4 ...), else None."""
        get = getattr(self.src, "blocks", None)
        if get is None or not all(self.src.has(n) for n in names):
            return None
        blocks = [get(n) for n in names]
        if any(b is None for b in blocks) or len({(b[0], b[2]) for b in blocks}) != 1:
            return None
        if blocks[0][0] not in supported_qtypes():
            return None
        return blocks[0][0], [b[1] for b in blocks], blocks[0][2]

    def stored_type(self, name: str) -> str:
        """The stored format of a tensor, for the conversion report."""
        get = getattr(self.src, "stored_type", None)
        return get(name) if get is not None else str(self.tensor(name).dtype).removeprefix("torch.")

    def norm(self, name: str) -> RMSNorm:
        return RMSNorm(self.tensor(name), self.args.rms_norm_eps)

    def gated_mlp(self, gate: str, up: str, down: str, expert: bool = False) -> GatedMLP:
        return GatedMLP(self.linear([gate, up], expert=expert), self.linear([down], expert=expert), self.args.hidden_act)

    def attention(self, i: int) -> Attention:
        a, s = self.args, self.spec
        qkv = [s.attn(i, f"{p}_proj.weight") for p in "qkv"]
        qkv_bias = [s.attn(i, f"{p}_proj.bias") for p in "qkv"] if a.attention_bias else None
        o_bias = [s.attn(i, "o_proj.bias")] if a.o_bias else None
        q_norm = k_norm = None
        if a.qk_norm:
            q_norm, k_norm = self.norm(s.attn(i, "q_norm.weight")), self.norm(s.attn(i, "k_norm.weight"))
        return Attention(
            a.cache_index(i), self.linear(qkv, qkv_bias), self.linear([s.attn(i, "o_proj.weight")], o_bias),
            a.num_heads, a.num_kv_heads, a.head_dim, q_norm, k_norm, a.qk_norm, a.clip_qkv, a.sliding_window,
            output_gate=a.attn_output_gate,
        )

    def experts(self, i: int) -> list[GatedMLP]:
        return [self.gated_mlp(*self.spec.expert(i, e), expert=True) for e in range(self.args.num_experts)]

    def router(self, i: int) -> TopKRouter | GroupedRouter:
        a, s = self.args, self.spec
        weight = self.tensor(s.moe(i, "gate.weight"))
        if a.routing is None:
            return TopKRouter(weight, a.top_k, a.norm_topk_prob)
        bias = self.optional(s.moe(i, s.router_bias)) if a.routing.scoring == "sigmoid" else None
        return GroupedRouter(weight, a.top_k, a.routing, bias)

    def moe(self, i: int, provider: ExpertProvider) -> MoEBlock:
        a, s = self.args, self.spec
        shared = gate = None
        if a.shared_expert_intermediate_size:
            shared = self.gated_mlp(*(s.moe(i, f"{s.shared_name}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")))
            gate = self.tensor(s.moe(i, "shared_expert_gate.weight")) if a.shared_expert_gate else None
        return MoEBlock(i, self.router(i), provider, shared, gate)  # type: ignore[arg-type]  # same call as TopKRouter

    def build(self, provider: ExpertProvider | None = None) -> Transformer:
        """provider=None holds every expert in RAM (ResidentExperts)."""
        a = self.args
        if provider is None:
            provider = ResidentExperts({i: self.experts(i) for i in a.moe_layers})
        layers = [self.layer(i, provider) for i in range(a.num_layers)]
        embed = self.embedding()  # [V, D], as stored (an mmap view if float; block rows for K-quants ...)
        model = Transformer(a, embed, layers, self.norm("model.norm.weight"), self.head(embed))
        if self.trunk is not None:
            self.trunk.save()
        if (note := self.conversion.report()) is not None:  # an explicit --quant conversion: say what it cost
            print(f"moemesh: {note}", file=sys.stderr)
        return model

    def layer(self, i: int, provider: ExpertProvider) -> DecoderLayer:
        """Decoder layer ``i`` (reads only that layer's tensors: mesh stages build a slice)."""
        a, s = self.args, self.spec
        if a.is_moe_layer(i):
            ffn = self.moe(i, provider)
        else:
            ffn = self.gated_mlp(*(s.dense_mlp(i, f"{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")))
        prefix = f"model.layers.{i}."
        return DecoderLayer(
            self.norm(prefix + "input_layernorm.weight"), self.attention(i),
            self.norm(prefix + "post_attention_layernorm.weight"), ffn,
        )

    def embedding(self) -> torch.Tensor | BlockTable:
        """The token table as stored: under auto a K-quant/MXFP4/IQ4 table stays block rows decoded per
        lookup (BlockTable); float, Q8_0 and Q4_0/Q4_1 tables decode to a tensor as before (the
        compiled decode step indexes a tensor)."""
        name = "model.embed_tokens.weight"
        if self.quant == "auto" and (blocks := self.block_rows([name])) is not None and blocks[0] not in TENSOR_TABLES:
            return BlockTable(blocks[0], blocks[1][0], blocks[2])
        return self.tensor(name)

    def head(self, embed: torch.Tensor | BlockTable) -> OutputHead:
        """fp32 when exactness was asked for (fp32, or auto on float checkpoints); otherwise a
        quantized matmul whose top candidates are rescored from the stored table (tied: the
        embedding itself; untied float checkpoints: an mmap view, so no second copy)."""
        name = "lm_head.weight"
        tied = self.args.tie_word_embeddings or not self.src.has(name)
        if self.quant == "auto" and not self.native_int4:  # a block-format head computes at its stored precision
            rows = (embed.qtype, [embed.raw], embed.dim) if tied and isinstance(embed, BlockTable) else \
                (None if tied else self.block_rows([name]))
            if rows is not None and rows[0] not in TENSOR_TABLES:
                return OutputHead(None, BlockLinear(rows[0], rows[1][0], rows[2]), rescore=0)
        table = embed if tied else self.tensor(name)
        mode = self.quant if self.quant != "auto" else ("int4" if self.native_int4 else "fp32")
        if mode == "fp32":
            return OutputHead(table.float())
        stored = getattr(self.src, "int4_parts", lambda _: None)("model.embed_tokens.weight" if tied else name)
        key = f"head:{mode}:{'model.embed_tokens.weight' if tied else name}"
        if (hit := self._cached(key)) is not None:
            return OutputHead(table, hit)
        if mode == "int4" and stored is not None:  # an int4 trunk's head (weights/int4_trunk.py): no float pass
            return OutputHead(table, self._keep(key, int4_head(stored)))
        return OutputHead(table, self._keep(key, from_float_rows(table, mode)))
