"""Route planning: which layer ranges a request runs where, and which peer serves each range.

A route covers layers [0, L) with ranges that chain exactly (end of one = start of the next);
each range is served by this node ("local") or by any live peer announcing exactly that range
(replicas are interchangeable, which is what failover relies on). Fewest hops wins, local
ranges are preferred on ties. Partially overlapping ranges are not combined.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..transport.membership import NodeRecord


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    local: bool


class NoRoute(Exception):
    pass


def plan_route(num_layers: int, local: tuple[int, int] | None, records: list[NodeRecord], model: str,
               self_id: str) -> list[Segment]:
    """Cheapest chain of ranges from 0 to num_layers; raises NoRoute naming the first gap."""
    edges: dict[int, dict[int, float]] = {}
    for rec in records:
        if rec.peer_id != self_id and rec.model == model and rec.num_layers == num_layers:
            a, b = rec.layers
            edges.setdefault(a, {})[b] = min(edges.get(a, {}).get(b, 1.0), 1.0)
    if local is not None:
        edges.setdefault(local[0], {})[local[1]] = 0.9  # our own layers: no network hop
    best: dict[int, float] = {0: 0.0}
    prev: dict[int, tuple[int, bool]] = {}
    heap = [(0.0, 0)]
    while heap:
        cost, at = heapq.heappop(heap)
        if at == num_layers:
            break
        if cost > best.get(at, float("inf")):
            continue
        for end, w in edges.get(at, {}).items():
            c = cost + w
            if c < best.get(end, float("inf")):
                best[end] = c
                prev[end] = (at, local is not None and (at, end) == local)
                heapq.heappush(heap, (c, end))
    if num_layers not in best:
        reached = max(best)
        raise NoRoute(f"no live node serves layers starting at {reached} (of {num_layers}); "
                      f"known ranges: {sorted({r.layers for r in records if r.model == model})}")
    segments, at = [], num_layers
    while at != 0:
        start, is_local = prev[at]
        segments.append(Segment(start, at, is_local))
        at = start
    return segments[::-1]


def replicas(records: list[NodeRecord], seg: Segment, model: str, self_id: str, exclude: set[str]) -> list[NodeRecord]:
    """Live peers serving exactly ``seg``, least loaded first."""
    found = [r for r in records if r.model == model and r.layers == (seg.start, seg.end)
             and r.peer_id != self_id and r.peer_id not in exclude]
    return sorted(found, key=lambda r: (r.load, r.peer_id))
