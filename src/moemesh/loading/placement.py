"""Load-time placement of the weights a decode step streams: every resident quantized buffer in a
huge-page arena (hugepages.py), and the scales of those the C kernels read every token (resident
experts, the trunk's int4 linears) rewritten in the kernels' block-major layout
(QuantLinear.use_block_scales): one run of scales per weight block instead of one every N_pad entries. Both change addresses only: same values,
same arithmetic, same bits. Done right after the model is built, before a compiled plan captures the
tensors (fused MLPs that already ran are told to forget their pointers).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..experts.provider import ResidentExperts
from ..layers.mlp import GatedMLP
from ..layers.moe import MoEBlock
from ..models.transformer import Transformer
from ..quant.hugepages import move_quantized
from ..quant.qlinear import QuantLinear


def resident_providers(model: Transformer) -> list[ResidentExperts]:
    blocks = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoEBlock)]
    return list({id(b.provider): b.provider for b in blocks if isinstance(b.provider, ResidentExperts)}.values())


def resident_expert_modules(model: Transformer) -> list[torch.nn.Module]:
    """Every module of the experts the model's MoE layers hold in RAM (ResidentExperts)."""
    return [m for p in resident_providers(model) for experts in p.experts.values() for e in experts for m in e.modules()]


def place_expert_weights(modules: list[torch.nn.Module]) -> int:
    """Huge pages and block scales for modules held like resident experts (benchkit/probe.py's
    pools: the rates it measures are the resident decode's). Returns how many linears use block scales."""
    move_quantized(modules)
    return sum(m.use_block_scales() for m in modules if isinstance(m, QuantLinear))


def place_decode_weights(model: Transformer, move_experts: bool = True,
                         release: Callable[[torch.Tensor], object] | None = None) -> int:
    """Trunk (and, with ``move_experts``, resident experts: a store's are read into their arena
    directly) into huge pages; block scales for every resident expert and int4 trunk linear.
    ``release(old)`` gets each tensor once copied (a checkpoint's ``page_out_view``: the file pages
    of a moved view go as the load goes). Returns how many linears now use block scales."""
    experts = resident_expert_modules(model)
    trunk = list(model.modules())
    move_quantized(trunk + experts if move_experts else trunk, release)
    linears = [m for m in trunk if isinstance(m, QuantLinear) and m.mode == "int4"]
    n = sum(m.use_block_scales() for m in linears + [m for m in experts if isinstance(m, QuantLinear)])
    for m in trunk + experts:  # a fused MLP that already ran cached the old pointers and format
        if isinstance(m, GatedMLP):
            m.forget_kernel_pointers()
    for p in resident_providers(model):  # and so did a provider's per-layer pointer tables
        p.forget_kernel_tables()
    return n
