"""The fused int4 expert kernel as a torch custom op, so a ``torch.compile`` graph
(engine/compiled.py) can call it as one opaque node per MoE layer: ``moemesh::moe_decode`` (one
token's routed experts through int4_ffn.c, summed in expert-id order like experts/mixing's grouped loop, so the compiled
MoE layer returns the eager one's bits for the same input). A custom op is called from the graph
through Python (tens of microseconds): worth it once per layer, not per linear.

Experts are named by a pointer table, int64 [E, 4] = data_ptr of (gate_up qweight, gate_up
scales, down qweight, down scales) per expert (``experts/mixing.expert_table``; scales are QuantLinear.int4_scales:
(scale, zero) pairs, or scales alone, in the layout ``fmt`` names, for every expert of the layer): a graph
input like any weight. The tensors it points into belong to ResidentExperts, which keeps them
alive and in place for the model's lifetime.
"""
from __future__ import annotations

import torch

from . import int4_experts, int4_native


@torch.library.custom_op("moemesh::moe_decode", mutates_args=())
def moe_decode(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, inter: int,
               gu_npad: int, dn_npad: int, fmt: int) -> torch.Tensor:
    """x fp32 [1, D], ids int64 [1, A], weights fp32 [1, A], table int64 [E, 4] -> [1, D]."""
    lib = int4_native.load_native()
    if lib is None:
        raise RuntimeError("moemesh::moe_decode: the C int4 kernel is not available")
    # one C call: picks sorted by expert id (as the eager path sums), pointers gathered from the
    # table, the experts and their weighted sum (~0.1 ms of Python and small torch ops per layer before)
    return int4_experts.moe_decode_table(lib, x, ids, weights, table, inter, gu_npad, dn_npad, fmt)


@moe_decode.register_fake
def _moe_decode_fake(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, inter: int,
                     gu_npad: int, dn_npad: int, fmt: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32)


# Linears at least this big (packed weight bytes) run moemesh's kernel in compiled graphs; smaller
# ones keep torch's, whose call has no Python in it. Measured here: a Python custom op costs ~8 us
# a call in a compiled graph (25 chained no-op calls: 0.19 ms), and on the Qwen3-shaped trunk (qkv
# 5.9 MB, o_proj 4.7 MB x 12 layers, head 38 MB) our kernel took 8.3 ms per token vs torch's 10.0
# (6 alternating rounds, /tmp harness); SmolLM2's linears (0.3-1 MB) gain too little to pay for it.
NATIVE_LINEAR_MIN_BYTES = 2 * 2**20


@torch.library.custom_op("moemesh::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out_features: int, fmt: int) -> torch.Tensor:
    """QuantLinear.forward's C-kernel path (few rows): x fp32 [M, K] -> [M, out_features], the same
    bits as the eager layer for the same x (one kernel, one arithmetic per row)."""
    lib = int4_native.load_native()
    if lib is None:
        raise RuntimeError("moemesh::int4_linear: the C int4 kernel is not available")
    y = int4_native.int4_matmul(lib, x, qweight, scales, fmt)  # [M, N_pad]
    return y if y.shape[1] == out_features else y[:, :out_features].contiguous()


@int4_linear.register_fake
def _int4_linear_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out_features: int, fmt: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)
