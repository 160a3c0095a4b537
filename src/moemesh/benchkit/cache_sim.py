"""Replay a recorded routing trace through the expert cache's own eviction policy: the hit rate a
cache of C slots gets on that token stream, without reading a byte.

The cache (experts/cache.py) on one MoE layer's lookup: every picked expert is pinned; a miss takes
a free slot or evicts the policy's victim among cached experts the layer does not use, then the
policy sees ``insert``; every picked expert is ``touch``ed. This replays exactly that bookkeeping
with the same policy classes (experts/policy.py). Not modelled: prefetches (a right one turns a miss
into a hit that is still read from disk, so bytes read are unchanged; a wrong one is an extra read
and may evict a useful expert: perfmodel's IO_FACTOR absorbs both).

A trace is a list of router calls in order, each ``[moe_layer_index, expert, expert, ...]`` (one
decode token: one call per MoE layer). ``skip_calls`` first calls fill the cache without being
counted, as a benchmark's untimed warm-up steps do.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..experts.policy import POLICIES


def replay_hit_rate(trace: Sequence[Sequence[int]], slots: int, policy: str = "lfu", skip_calls: int = 0) -> float:
    """Fraction of counted lookups that find their expert cached (1.0 when none are counted)."""
    pol = POLICIES[policy]()
    cached: set[tuple[int, int]] = set()
    hits = lookups = 0
    for i, call in enumerate(trace):
        layer, experts = int(call[0]), [int(e) for e in call[1:]]
        keys = list(dict.fromkeys((layer, e) for e in experts))  # a token picks an expert once
        if len(keys) > slots:
            raise ValueError(f"a layer picks {len(keys)} experts but the cache has {slots} slots")
        protect, counted = set(keys), i >= skip_calls
        for key in keys:
            lookups += counted
            if key in cached:
                hits += counted
            else:
                if len(cached) >= slots:
                    victim = pol.victim_where(lambda k: k in cached and k not in protect)
                    cached.discard(victim)
                    pol.forget(victim)
                cached.add(key)
                pol.insert(key)
            pol.touch(key)
    return 1.0 if lookups == 0 else hits / lookups
