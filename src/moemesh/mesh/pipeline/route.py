"""Route planning: which node runs which layers of a request, as a chain of segments over [0, L).

Each node offers a **share**: an explicit layer range (``--layers A:B``, or the whole model by
default) or none (``--layers auto``). A node that built every layer is **elastic**: it can also run
any range a plan gives it. The plan is the cheapest chain from layer 0 to L over

- fixed edges: a node's share (cost 1, this node's own 0.9: no network hop), replicas of one
  range interchangeable (least loaded first);
- gap edges [i, j): the layers no share covers (a dead node's, or everything in an all-auto
  mesh), split among the elastic nodes in proportion to their capacity (their expert cache:
  equal hit rates), this node first. A gap costs 1 + 4 (j - i) / L, so a plan uses every live
  share it can and fills only what is missing: that is failover by re-planning. A node that
  comes back announces its share again and the next plan uses it.

Consecutive segments of one node are merged. No route (a gap and no elastic node) -> NoRoute
naming the first layer nobody serves.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..transport.membership import NodeRecord

GAP_COST_PER_MODEL = 4.0  # a gap over the whole model costs 1 + this; one fixed hop costs 1


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    peer: str | None  # None: this node

    @property
    def local(self) -> bool:
        return self.peer is None


@dataclass(frozen=True)
class Candidate:
    """What the planner needs of a node (``peer`` None: this node)."""

    peer: str | None
    share: tuple[int, int] | None
    elastic: bool = False
    capacity: float = 1.0
    load: float = 0.0


class NoRoute(Exception):
    pass


def candidates(records: list[NodeRecord], model: str, num_layers: int, self_id: str,
               exclude: set[str] = frozenset()) -> list[Candidate]:
    """Live peers of this model (not us, not excluded) as planner candidates."""
    out = []
    for r in records:
        if r.peer_id == self_id or r.peer_id in exclude or r.model != model or r.num_layers != num_layers:
            continue
        share = tuple(r.share) if r.share is not None else (None if r.elastic else r.layers)
        out.append(Candidate(r.peer_id, share, r.elastic, float(max(1, r.capacity)), r.load))  # type: ignore[arg-type]
    return out


def split_range(start: int, end: int, nodes: list[Candidate]) -> list[Segment]:
    """[start, end) in consecutive pieces, one per node in order, sized by capacity (>= 1 layer each;
    with more nodes than layers the largest capacities get one each)."""
    n = end - start
    if len(nodes) > n:  # keep the caller's order among those kept
        kept = {id(c) for c in sorted(nodes, key=lambda c: -c.capacity)[:n]}
        nodes = [c for c in nodes if id(c) in kept]
    total = sum(c.capacity for c in nodes)
    exact = [n * c.capacity / total for c in nodes]
    sizes = [max(1, int(e)) for e in exact]
    while sum(sizes) > n:  # the floor of one layer each may overshoot: take back from the biggest
        sizes[sizes.index(max(sizes))] -= 1
    order = sorted(range(len(nodes)), key=lambda i: -(exact[i] - int(exact[i])))
    for i in order[: n - sum(sizes)]:  # largest remainders first
        sizes[i] += 1
    segs, at = [], start
    for c, size in zip(nodes, sizes):
        segs.append(Segment(at, at + size, c.peer))
        at += size
    return segs


def plan_route(num_layers: int, me: Candidate | None, others: list[Candidate]) -> list[Segment]:
    """The cheapest chain of segments from layer 0 to ``num_layers``; raises NoRoute."""
    nodes = ([me] if me is not None else []) + sorted(others, key=lambda c: (c.load, c.peer or ""))
    fixed: dict[tuple[int, int], Candidate] = {}
    for c in nodes:  # first per range wins: this node, then the least loaded replica
        if c.share is not None:
            fixed.setdefault(c.share, c)
    elastic = [c for c in nodes if c.elastic]
    if me is not None and me.elastic:  # this node first in every gap: no hop before it
        elastic = [me] + sorted([c for c in elastic if c is not me], key=lambda c: c.peer or "")
    else:
        elastic = sorted(elastic, key=lambda c: c.peer or "")
    edges: dict[int, list[tuple[int, float, Candidate | None]]] = {}
    for (a, b), c in fixed.items():
        edges.setdefault(a, []).append((b, 0.9 if c.peer is None else 1.0, c))
    if elastic:
        for a in range(num_layers):
            for b in range(a + 1, num_layers + 1):
                edges.setdefault(a, []).append((b, 1.0 + GAP_COST_PER_MODEL * (b - a) / num_layers, None))
    best, prev = {0: 0.0}, {}
    heap = [(0.0, 0)]
    while heap:
        cost, at = heapq.heappop(heap)
        if at == num_layers:
            break
        if cost > best.get(at, float("inf")):
            continue
        for end, w, c in edges.get(at, []):
            if cost + w < best.get(end, float("inf")) - 1e-12:
                best[end], prev[end] = cost + w, (at, c)
                heapq.heappush(heap, (cost + w, end))
    if num_layers not in best:
        raise NoRoute(f"no live node serves layers starting at {max(best)} (of {num_layers}); known shares: "
                      f"{sorted(fixed)}")
    segs: list[Segment] = []
    at = num_layers
    while at != 0:
        start, c = prev[at]
        segs[:0] = [Segment(start, at, c.peer)] if c is not None else split_range(start, at, elastic)
        at = start
    return merge(segs)


def merge(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segs:
        if out and out[-1].peer == s.peer and out[-1].end == s.start:
            out[-1] = Segment(out[-1].start, s.end, s.peer)
        else:
            out.append(s)
    return out
