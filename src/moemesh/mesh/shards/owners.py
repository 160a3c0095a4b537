"""Who computes which expert of a layer in expert-shard mode.

In order: experts this node holds (or was given: ``--experts``) are computed here; experts some live
peer holds go to the fewest such peers (greedy: the peer holding most of what is left, least loaded
on ties); the rest go to the elastic nodes (``--ram``: every expert in their own copy of the
model) by weighted rendezvous hashing over (peer, layer, expert), each node weighted by its expert
cache. Rendezvous gives every elastic node a share in proportion to its cache, the same share on
every node that computes it, and when a node leaves only its experts move (to the survivors, in
proportion again): failover by re-planning, with every other node's cache left warm. A node that
comes back takes its share back at the next plan.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from ...errors import MoemeshError
from ..transport.membership import NodeRecord


@dataclass(frozen=True)
class Holder:
    peer: str  # peer id (this node's own too: rendezvous needs one name on every node)
    experts: frozenset[int] | None  # ids it holds or was given; None: none declared
    elastic: bool = False
    capacity: float = 1.0
    load: float = 0.0


def holders(records: list[NodeRecord], model: str, layer: int, exclude: set[str] = frozenset()) -> list[Holder]:
    """Live peers of this model whose trunk covers ``layer``."""
    out = []
    for r in records:
        if r.model != model or r.peer_id in exclude or not r.layers[0] <= layer < r.layers[1]:
            continue
        declared = frozenset(r.experts) if r.experts is not None else (None if r.elastic else frozenset())
        out.append(Holder(r.peer_id, declared, r.elastic, float(max(1, r.capacity)), r.load))
    return out


def rendezvous(nodes: list[Holder], layer: int, expert: int) -> Holder:
    """Weighted rendezvous hashing: the node maximising -capacity / ln(u), u = hash(peer, layer, expert) in (0, 1)."""
    def score(h: Holder) -> float:
        digest = hashlib.blake2b(f"{h.peer}/{layer}/{expert}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2**64
        return -h.capacity / math.log(u)

    return max(nodes, key=lambda h: (score(h), h.peer))


def assign(layer: int, experts: list[int], me: Holder, others: list[Holder]) -> dict[str, list[int]]:
    """peer -> its experts (sorted); ``me.peer`` for ours. MoemeshError naming experts nobody has."""
    left = [e for e in experts if not (me.experts is not None and e in me.experts)]
    out: dict[str, list[int]] = {me.peer: [e for e in experts if e not in left]} if len(left) < len(experts) else {}
    declared = {e: [h for h in others if h.experts is not None and e in h.experts] for e in left}
    todo = {e for e in left if declared[e]}
    while todo:  # greedy cover by declared holders
        cover: dict[str, list[int]] = {}
        load = {}
        for e in todo:
            for h in declared[e]:
                cover.setdefault(h.peer, []).append(e)
                load[h.peer] = h.load
        peer = max(cover, key=lambda p: (len(cover[p]), -load[p], p))
        out.setdefault(peer, []).extend(cover[peer])
        todo -= set(cover[peer])
    elastic = [h for h in [me] + others if h.elastic]
    missing = []
    for e in left:
        if declared[e]:
            continue
        if not elastic:
            missing.append(e)
            continue
        out.setdefault(rendezvous(elastic, layer, e).peer, []).append(e)
    if missing:
        raise MoemeshError(f"layer {layer}: no live node holds experts {missing}")
    return {p: sorted(es) for p, es in out.items()}
