"""LazyExperts: experts stay in the store on disk and are read into a RAM-budgeted cache when the
router picks them, with the next layer's likely experts prefetched while this layer computes.

Exactness: experts are combined in expert-id order with the same kernels as ResidentExperts over
the same stored weights, so the output is bit-identical; waves (when one layer needs more
experts than the cache has slots) keep that order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..layers.router import TopKRouter
from .cache import ExpertCache
from .mixing import Group, GroupedProvider, add_in_order, batchable, block_mix, expert_rows, group_by_expert, mix_batch


class Lookahead:
    """Predicts layer ``next_layer``'s experts from layer l's FFN input.

    With an unchanged residual h, norm_{l+1}(h) = (w_{l+1} / w_l) * norm_l(h), so the next
    router sees the current normalized input rescaled per channel; the residual does change
    by this layer's FFN and the next attention, which is what makes it a prediction.
    """

    def __init__(self, next_layer: int, ratio: torch.Tensor, router: TopKRouter, top: int | None = None) -> None:
        self.next_layer = next_layer
        self.ratio = ratio  # [D]
        self.router = router
        self.top = top  # None: all of each token's top-k; n: only its n most likely (fewer wasted reads)

    def predict(self, x: torch.Tensor) -> list[int]:
        return sorted(e for e, rank in self.predict_ranked(x).items() if self.top is None or rank < self.top)

    def predict_ranked(self, x: torch.Tensor) -> dict[int, int]:
        """expert -> its best rank over the tokens of x (0 = some token's most likely)."""
        ids, _ = self.router(x * self.ratio)  # [T, A], most likely first
        ranked: dict[int, int] = {}
        for row in ids.tolist():
            for rank, e in enumerate(row):
                ranked[e] = min(rank, ranked.get(e, rank))
        return ranked


class RankGate:
    """Which prediction ranks are worth a prefetch, measured on this model while it runs.

    A prefetch that is not used costs a whole blob read and a cache slot; a used one only moves a
    read that would happen anyway earlier. So rank r (the r-th most likely next-layer expert of a
    token) is prefetched while its measured precision (used / predicted) is at least
    ``threshold``, and always during its first ``warmup`` predictions. Every rank keeps being
    predicted and scored whether or not it is prefetched, so a gate can reopen.
    """

    def __init__(self, threshold: float, warmup: int = 32) -> None:
        self.threshold = threshold
        self.warmup = warmup
        self.total: list[int] = []  # per rank: predictions scored
        self.right: list[int] = []  # per rank: of those, used by the next layer

    def open(self, rank: int) -> bool:
        if self.threshold <= 0 or rank >= len(self.total) or self.total[rank] < self.warmup:
            return True
        return self.right[rank] >= self.threshold * self.total[rank]

    def score(self, rank: int, used: bool) -> None:
        while rank >= len(self.total):
            self.total.append(0)
            self.right.append(0)
        self.total[rank] += 1
        self.right[rank] += int(used)

    def precision(self) -> list[float | None]:
        return [r / t if t else None for r, t in zip(self.right, self.total)]


class LazyExperts(GroupedProvider):
    streams_experts = True

    def __init__(self, cache: ExpertCache, lookahead: dict[int, Lookahead] | None = None,
                 gate: RankGate | None = None) -> None:
        self.cache = cache
        self.lookahead = lookahead or {}
        self.gate = gate  # None: prefetch every predicted expert (or a Lookahead's fixed top)
        self.predicted: dict[int, dict[int, int]] = {}  # layer -> {expert: rank} predicted for its next run
        self.predicted_total = 0
        self.predicted_right = 0
        self.token_layers = 0  # (token, layer) visits; / MoE layers = tokens, for per-token figures
        self.layers_seen: set[int] = set()
        # (layer, expert) -> whether to prefetch it; None: every prediction. A mesh node caches only
        # its own share, so it skips experts another node will compute (and layers it does not run)
        self.prefetch_filter: Callable[[int, int], bool] | None = None

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            rows: int | None = None) -> torch.Tensor:
        # x: [T, D], ids/weights: [T, A] -> [T, D]
        groups = group_by_expert(ids)
        if not batchable(x, ids, rows, min_tokens=1) or len(groups) > self.cache.num_slots:
            return super().run(layer, x, ids, weights, rows)
        # every expert already read: one int4 call when they are fusable (the grouped loop's bits, as
        # ResidentExperts computes them), else the grouped loop; reads still on their way: the cached
        # experts are computed while the others land (what the grouped loop does)
        self._note(layer, x, groups)
        entries = self.cache.acquire([(layer, e) for e, _, _ in groups])
        try:
            self._prefetch_next(layer, x, {e.key for e in entries})
            if any(e.future is not None and not e.future.done() for e in entries):
                ys = self._compute_as_ready(entries, groups, x, weights.reshape(-1), None)
            else:
                mlps = [self.cache.expert(e) for e in entries]
                out = mix_batch(mlps, groups, x, ids, weights)
                if out is None:
                    out = block_mix(mlps, groups, x, weights.reshape(-1))
                if out is not None:
                    return out
                ys = expert_rows(mlps, groups, x, weights.reshape(-1))
        finally:
            self.cache.release(entries)
        return add_in_order(x, groups, ys)

    def _note(self, layer: int, x: torch.Tensor, groups: list[Group]) -> None:
        self._score_prediction(layer, [e for e, _, _ in groups])
        self.token_layers += x.shape[0]
        self.layers_seen.add(layer)

    def weighted_outputs(self, layer: int, x: torch.Tensor, groups: list[Group], flat_w: torch.Tensor, *,
                         rows: int | None = None) -> list[torch.Tensor]:
        # x: [T, D]; groups in expert-id order -> each expert's weighted rows [n, D]
        self._note(layer, x, groups)
        ys: list[torch.Tensor] = []
        wave = self.cache.num_slots
        for start in range(0, len(groups), wave):  # waves keep expert-id order: same sums as resident
            chunk = groups[start : start + wave]
            entries = self.cache.acquire([(layer, e) for e, _, _ in chunk])
            try:
                if start == 0:
                    self._prefetch_next(layer, x, {e.key for e in entries})
                ys += self._compute_as_ready(entries, chunk, x, flat_w, rows)
            finally:
                self.cache.release(entries)
        return ys

    def _compute_as_ready(self, entries: list, chunk: list, x: torch.Tensor, flat_w: torch.Tensor,
                          rows: int | None) -> list[torch.Tensor]:
        """Each expert's weighted output [n, D], computed in the order their reads complete
        (cached experts first, while the misses are still on their way); only the waiting falls
        back to expert-id order, which is also the order the reads were issued in."""
        ys: list[torch.Tensor | None] = [None] * len(entries)
        pending = list(range(len(entries)))
        while pending:
            ready = [i for i in pending if entries[i].future is None or entries[i].future.done()] or pending[:1]
            outs = expert_rows([self.cache.expert(entries[i]) for i in ready], [chunk[i] for i in ready], x, flat_w, rows)
            for i, y in zip(ready, outs):
                ys[i] = y
            pending = [i for i in pending if ys[i] is None]
        return ys  # type: ignore[return-value]

    def _prefetch_next(self, layer: int, x: torch.Tensor, protect: set) -> None:
        look = self.lookahead.get(layer)
        if look is None:
            return
        ranked = look.predict_ranked(x)
        self.predicted[look.next_layer] = ranked
        chosen = sorted(e for e, r in ranked.items()
                        if (look.top is None or r < look.top) and (self.gate is None or self.gate.open(r)))
        if self.prefetch_filter is not None:
            chosen = [e for e in chosen if self.prefetch_filter(look.next_layer, e)]
        self.cache.prefetch([(look.next_layer, e) for e in chosen], protect)

    def _score_prediction(self, layer: int, actual: list[int]) -> None:
        predicted = self.predicted.pop(layer, None)
        if predicted is None:
            return
        self.predicted_total += len(actual)
        self.predicted_right += len(predicted.keys() & set(actual))
        if self.gate is not None:
            used = set(actual)
            for e, rank in predicted.items():
                self.gate.score(rank, e in used)

    def stats(self) -> dict:
        s = self.cache.stats
        reader = self.cache.reader
        lookups = s.hits + s.misses
        tokens = self.token_layers / max(1, len(self.layers_seen))
        per_token = (lambda v: v / tokens if tokens else None)  # noqa: E731
        return {
            "tokens": tokens,
            "misses_per_token": per_token(s.misses),
            "bytes_read_per_token": per_token(reader.bytes_read),
            "stall_seconds_per_token": per_token(s.stall_seconds),
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hits / lookups if lookups else None,
            "bytes_read": reader.bytes_read,
            "read_seconds": reader.read_seconds,
            "read_bandwidth_bytes_s": reader.bytes_read / reader.read_seconds if reader.read_seconds else None,
            "stall_seconds": s.stall_seconds,
            "read_retries": s.read_retries,
            "read_failures": s.read_failures,
            "prefetch_issued": s.prefetch_issued,
            "prefetch_hits": s.prefetch_hits,
            "prefetch_accuracy": self.predicted_right / self.predicted_total if self.predicted_total else None,
            "prefetch_rank_precision": self.gate.precision() if self.gate is not None else None,
            "cache_slots": self.cache.num_slots,
            "cache_bytes": self.cache.nbytes(),
            "blob_bytes": self.cache.blob_size,
            "o_direct": reader.direct,
        }
