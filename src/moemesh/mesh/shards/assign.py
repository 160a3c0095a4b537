"""Which experts a node holds in expert-shard mode (``mesh serve --experts auto|A:B|LIST``).

Every node holds the trunk (attention, norms, routers, dense FFNs) of every layer and the same
expert ids in every MoE layer. ``A:B`` and lists (``0,3,5:8``) are explicit; ``auto`` looks at
the experts the live nodes already hold and takes the least-held ones first (ties: lowest id),
as many as its memory allows, so the first nodes cover every expert once and later ones add
replicas (which is what failover uses).
"""
from __future__ import annotations

from collections.abc import Iterable

from ...errors import MoemeshError

AUTO = "auto"
MEMORY_FRACTION = 0.8  # of free memory that ``auto`` gives to experts (the rest: KV, activations, OS)


def parse_experts(text: str, num_experts: int) -> list[int] | None:
    """``auto`` -> None (decided at start); ``A:B`` / ``0,3,5:8`` -> sorted unique ids in [0, E)."""
    text = text.strip()
    if text == AUTO:
        return None
    if num_experts <= 0:
        raise MoemeshError("--experts needs an MoE model (this one has no experts)")
    held: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, sep, b = part.partition(":")
        try:
            if sep:
                start, end = int(a) if a.strip() else 0, int(b) if b.strip() else num_experts
            else:
                start = int(a)
                end = start + 1
        except ValueError:
            raise MoemeshError(f"--experts {text!r}: expected auto, A:B or a list like 0,3,5:8") from None
        if not 0 <= start < end <= num_experts:
            raise MoemeshError(f"--experts {text!r}: ids must lie in [0, {num_experts}) (the model has "
                               f"{num_experts} experts per layer)")
        held.update(range(start, end))
    if not held:
        raise MoemeshError(f"--experts {text!r}: no expert ids")
    return sorted(held)


def expert_capacity(memory_bytes: int, bytes_per_expert: int, num_experts: int) -> int:
    """How many expert ids (each over every MoE layer) fit in ``memory_bytes``; at most E."""
    if bytes_per_expert <= 0:
        return num_experts
    return max(0, min(num_experts, memory_bytes // bytes_per_expert))


def auto_assign(num_experts: int, held_by_others: Iterable[list[int] | None], capacity: int) -> list[int]:
    """The ``capacity`` least-held experts (None in ``held_by_others``: a node holding all)."""
    cover = [0] * num_experts
    for held in held_by_others:
        for e in (range(num_experts) if held is None else held):
            if 0 <= e < num_experts:
                cover[e] += 1
    order = sorted(range(num_experts), key=lambda e: (cover[e], e))
    return sorted(order[: max(0, min(capacity, num_experts))])


def describe(held: list[int] | None, num_experts: int = 0) -> str:
    """Compact ranges: [0, 1, 2, 5] -> '0:3,5' ('all' when every one of ``num_experts`` is held)."""
    if held is not None and not held:
        return "none"
    if held is None or list(held) == list(range(num_experts)):
        return "all"
    runs, start, prev = [], held[0], held[0]
    for e in list(held[1:]) + [None]:
        if e is not None and e == prev + 1:
            prev = e
            continue
        runs.append(str(start) if prev == start else f"{start}:{prev + 1}")
        if e is not None:
            start = prev = e
    return ",".join(runs)
