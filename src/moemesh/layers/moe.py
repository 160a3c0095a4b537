"""The MoE feed-forward block and the ExpertProvider contract it calls.

Shape legend: T tokens, D hidden, A active experts per token, E experts.
The block routes and hands the picks to its provider; it never touches an expert weight. Providers
(resident, lazy, remote) live in ``experts/`` and share one mixing loop (``experts/mixing.py``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from .mlp import GatedMLP
from .router import TopKRouter


class ExpertProvider(ABC):
    """Computes sum_a weights[t, a] * expert_{ids[t, a]}(x[t]) for one MoE layer.

    Invariant: the result equals ``experts.mixing.mix_reference`` over the same expert weights (up to
    fp summation order; providers built on ``experts.mixing.GroupedProvider`` add experts in id order,
    so they agree with each other bit for bit); every expert of a layer is read at most once per call.
    """

    # True when experts are read from disk as they are used (a RAM-budgeted cache): a long prompt
    # should then visit each expert once per layer (the engine's layer-major prefill), not once per chunk
    streams_experts: bool = False

    @abstractmethod
    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            rows: int | None = None) -> torch.Tensor:
        """x: [T, D], ids: [T, A] int64, weights: [T, A] fp32 -> [T, D]. ``rows``: compute each expert
        over its tokens in blocks of ``rows`` consecutive tokens, as a chunked pass would (layer-major
        prefill: the same kernel calls as chunked prefill, so the same bits whatever a kernel's batch
        behaviour), while still loading each expert once."""

    def stats(self) -> dict:
        return {}

    def decode_op(self, layer: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | str:
        """``run(layer, ...)`` for one decode token as something a compiled graph can call: a function of
        (x [1, D], ids [1, A], weights [1, A]) -> [1, D] made of graph ops (e.g. one custom op over the
        layer's weights) with ``run``'s result; or, when this provider's experts cannot run inside a
        graph, a sentence saying why (the compiled decode step then declines the model: decoding stays eager)."""
        return f"experts behind {type(self).__name__} have no graph form (they run eagerly)"


class MoEBlock(torch.nn.Module):
    """Router -> expert provider -> (+ gated shared expert). Never touches expert weights itself."""

    def __init__(
        self,
        layer: int,
        router: TopKRouter,
        provider: ExpertProvider,
        shared: GatedMLP | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.router = router
        self.provider = provider
        self.shared = shared
        # qwen2_moe: sigmoid(x @ g.T) scales the shared expert; g: [1, D]
        self.shared_gate = None if shared_gate is None else torch.nn.Parameter(shared_gate.float(), requires_grad=False)

    def prepare_graph(self) -> str | None:
        """Before a compiled decode step traces this block: ask the provider for its graph form
        (``ExpertProvider.decode_op``). Returns why the block cannot run in a graph, or None."""
        op = self.provider.decode_op(self.layer)
        self._graph_experts = None if isinstance(op, str) else op
        return op if isinstance(op, str) else None

    def forward(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        # x: [T, D] -> [T, D]. rows: route and run the shared expert in blocks of ``rows`` tokens, and
        # let the provider compute experts in the same blocks (layer-major prefill == chunked prefill)
        if rows is None or x.shape[0] <= rows:
            ids, weights = self.router(x)
            if torch.compiler.is_compiling():  # one decode token in a compiled step (prepare_graph ran first)
                out = self._graph_experts(x, ids, weights)
            else:
                out = self.provider.run(self.layer, x, ids, weights)
            return self._add_shared(x, out)
        picks = [self.router(x[a : a + rows]) for a in range(0, x.shape[0], rows)]
        ids, weights = torch.cat([p[0] for p in picks]), torch.cat([p[1] for p in picks])  # [T, A]
        out = self.provider.run(self.layer, x, ids, weights, rows=rows)  # each routed expert loaded once
        return torch.cat([self._add_shared(x[a : a + rows], out[a : a + rows]) for a in range(0, x.shape[0], rows)])

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.shared is None:
            return out
        shared = self.shared(x)
        if self.shared_gate is not None:
            shared = torch.sigmoid(torch.nn.functional.linear(x, self.shared_gate)) * shared
        return out + shared
