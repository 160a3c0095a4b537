"""Replaying a routing trace as a model's router picks (benchmarks only).

A benchmark model with random weights routes uniformly; ``TraceReplay.install`` makes its MoE
layers pick what a calibrated trace (benchkit/routing_trace.py) says instead, so the expert cache
sees a real model's reuse and popularity while every byte is still read and every expert computed.
MoE layer j of the model replays trace layer j; each router call consumes as many trace tokens as it
has rows (a prefill chunk, a decode token), so prefill and decode walk the trace in order. Routing
weights are uniform (1/k): the benchmark measures time, not text. The lazy provider's next-layer
predictors are replaced too: they see the next layer's true picks with each pick wrong with
probability 1 - ``predict_accuracy`` (published predictors: 72-94%), so prefetch behaves like a real
predictor rather than an oracle or the random model's own router.
"""
from __future__ import annotations

import numpy as np
import torch

from ..models.transformer import Transformer
from .routing_trace import Trace


class TraceReplay:
    def __init__(self, trace: Trace, predict_accuracy: float = 0.8, seed: int = 0) -> None:
        if not 0.0 <= predict_accuracy <= 1.0:
            raise ValueError(f"predict_accuracy must be in [0, 1], got {predict_accuracy}")
        self.trace = trace  # [tokens, layers, k]
        self.predict_accuracy = predict_accuracy
        self.rng = np.random.default_rng(seed)
        self.cursor: dict[int, int] = {}  # trace layer -> next trace token it replays

    def rows(self, layer: int, n: int, consume: bool) -> np.ndarray:
        """The next ``n`` trace tokens' picks of ``layer`` (the trace wraps around), [n, k]."""
        start = self.cursor.get(layer, 0)
        idx = (start + np.arange(n)) % self.trace.shape[0]
        if consume:
            self.cursor[layer] = start + n
        return self.trace[idx, layer].astype(np.int64)

    def pick(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.rows(layer, x.shape[0], consume=True))  # [T, k]
        return ids, torch.full(ids.shape, 1.0 / ids.shape[1], dtype=torch.float32)

    def predict(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The picks ``layer`` is about to make, each replaced at random with probability 1 - accuracy."""
        ids = self.rows(layer, x.shape[0], consume=False)  # [T, k]
        experts = int(self.trace.max()) + 1
        wrong = self.rng.random(ids.shape) >= self.predict_accuracy
        ids = np.where(wrong, self.rng.integers(0, experts, ids.shape), ids)
        t = torch.from_numpy(ids)
        return t, torch.full(t.shape, 1.0 / t.shape[1], dtype=torch.float32)

    def install(self, model: Transformer) -> None:
        """Point every MoE router of ``model`` (and the lazy provider's predictors) at the trace."""
        moe = [i for i, layer in enumerate(model.layers) if hasattr(layer.ffn, "router")]
        if len(moe) > self.trace.shape[1]:
            raise ValueError(f"the model has {len(moe)} MoE layers but the trace {self.trace.shape[1]}")
        index = {layer: j for j, layer in enumerate(moe)}
        for layer, j in index.items():
            model.layers[layer].ffn.router = _Picks(self, j)
        for layer in moe:
            for look in getattr(model.layers[layer].ffn.provider, "lookahead", {}).values():
                if look.next_layer in index:
                    look.router = _Predictor(self, index[look.next_layer])


class _Picks(torch.nn.Module):
    def __init__(self, replay: TraceReplay, layer: int) -> None:
        super().__init__()
        self.replay, self.layer = replay, layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.replay.pick(self.layer, x)


class _Predictor:
    def __init__(self, replay: TraceReplay, layer: int) -> None:
        self.replay, self.layer = replay, layer

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.replay.predict(self.layer, x)
