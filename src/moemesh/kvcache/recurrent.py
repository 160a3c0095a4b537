"""Recurrent state for linear-attention layers, and the cache of a hybrid model.

A Gated DeltaNet layer (Qwen3-Next, Qwen3.5) keeps, per sequence, a fixed-size state instead of
growing keys and values: the last K - 1 inputs of its causal convolution ``conv`` [C, K - 1] and
the delta rule's matrix ``ssm`` [Hv, Dk, Dv]. ``RecurrentStateCache`` holds them per layer per
sequence (zeros for a new sequence: the convolution's left padding and an empty memory).

``HybridCache`` is the model's cache for a hybrid stack: a KV cache (dense or TurboQuant) for its
attention layers (numbered 0..n-1 among themselves) and a RecurrentStateCache for its
linear-attention layers (numbered likewise), behind the one KVCache interface the engine uses.

Prefix sharing: the state after a prefix is not recoverable from the KV entries of that prefix,
so a hybrid sequence cannot resume from shared KV blocks unless the state at that point was
snapshotted. ``shares_prefixes`` is False: prefix caches must not hand such a sequence a prefix.
(``snapshot``/``restore`` copy a sequence's states, the piece a later prefix cache would store
beside its blocks.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVCache
from .wrapped import WrappedKVCache


@dataclass
class LinearState:
    conv: torch.Tensor  # [C, K - 1] the convolution's last inputs
    ssm: torch.Tensor  # [Hv, Dk, Dv] the delta rule's state


@dataclass(frozen=True)
class StateShape:
    conv_dim: int  # C: channels of the causal convolution (q, k and v together)
    conv_len: int  # K - 1 inputs kept
    heads: int  # Hv
    k_dim: int  # Dk
    v_dim: int  # Dv

    def nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        size = torch.tensor([], dtype=dtype).element_size()
        return size * (self.conv_dim * self.conv_len + self.heads * self.k_dim * self.v_dim)


class RecurrentStateCache:
    def __init__(self, num_layers: int, shape: StateShape, dtype: torch.dtype = torch.float32) -> None:
        self.num_layers, self.shape, self.dtype = num_layers, shape, dtype
        self.seqs: dict[int, list[LinearState]] = {}

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already in the state cache")
        s = self.shape
        self.seqs[seq_id] = [LinearState(torch.zeros(s.conv_dim, s.conv_len, dtype=self.dtype),
                                         torch.zeros(s.heads, s.k_dim, s.v_dim, dtype=self.dtype))
                             for _ in range(self.num_layers)]

    def free_sequence(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def get(self, layer: int, seq_id: int) -> LinearState:
        """The layer's state of the sequence; the layer replaces its fields as it advances."""
        return self.seqs[seq_id][layer]

    def snapshot(self, seq_id: int) -> list[LinearState]:
        return [LinearState(s.conv.clone(), s.ssm.clone()) for s in self.seqs[seq_id]]

    def restore(self, seq_id: int, states: list[LinearState]) -> None:
        self.seqs[seq_id] = [LinearState(s.conv.clone(), s.ssm.clone()) for s in states]

    def nbytes(self) -> int:
        return len(self.seqs) * self.num_layers * self.shape.nbytes(self.dtype)


class HybridCache(WrappedKVCache):
    """KV cache for the attention layers + recurrent states for the linear-attention layers. Layer-major
    prefill works when the KV cache writes at explicit positions: each linear layer takes a prompt's
    chunks in order and keeps its own state, whatever the other layers are at. Bytes per token are
    the attention layers' KV (the recurrent states are a fixed size per sequence)."""

    shares_prefixes = False  # see the module docstring

    def __init__(self, kv: KVCache, states: RecurrentStateCache) -> None:
        super().__init__(kv, states)
        self.states = states


def states_of(cache: KVCache) -> RecurrentStateCache:
    """The recurrent states a linear-attention layer reads; a clear error for a plain KV cache."""
    states = getattr(cache, "states", None)  # a HybridCache, or a pipeline stage's view of one
    if states is None:
        raise TypeError(f"a linear-attention layer needs a HybridCache (the model's new_cache()), got {type(cache).__name__}")
    return states
