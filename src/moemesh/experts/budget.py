"""The --ram budget: the whole process (trunk + KV cache + runtime + prefix cache + expert cache).

The expert cache gets what remains after the trunk's measured bytes, a KV-cache reserve, a
fixed runtime overhead and the prefix cache's budget (kvcache/prefix_cache.py; 0 when off). RUNTIME_OVERHEAD covers the Python interpreter with torch and moemesh
imported (measured ~272 MiB peak RSS on the reference machine) plus activations and allocator
slack for small batches; the memory test checks peak RSS against this accounting.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import MoemeshError

RUNTIME_OVERHEAD = 384 * 2**20
PREFIX_AUTO_MAX = 2**30  # the automatic prefix-cache budget's ceiling
PREFIX_AUTO_SHARE = 0.10  # ... and its share of what is left for caches when the experts do not all fit
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30, "t": 2**40, "tb": 2**40}


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GB', '1073741824' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower().replace("ib", "b").removesuffix("i") if m else None
    if unit not in UNITS:
        raise MoemeshError(f"cannot read size {text!r}: use a number with K, M, G or T (e.g. 8G)")
    return int(float(m.group(1)) * UNITS[unit])


@dataclass
class BudgetPlan:
    ram: int
    trunk: int
    kv_reserve: int
    overhead: int
    expert_cache: int
    slots: int
    prefix_cache: int = 0


def auto_prefix_bytes(caches: int, all_experts: int) -> int:
    """The prefix cache's automatic share of ``caches`` (what trunk, KV reserve and runtime leave):
    the room every expert leaves, but at least PREFIX_AUTO_SHARE of it, at most PREFIX_AUTO_MAX."""
    return int(max(0, min(PREFIX_AUTO_MAX, max(caches - all_experts, PREFIX_AUTO_SHARE * caches))))


def plan_budget(ram: int, trunk_bytes: int, kv_reserve: int, blob_size: int, min_slots: int,
                prefix_cache: int | None = 0, all_experts: int = 0) -> BudgetPlan:
    """Slots for the expert cache; refuses a budget that cannot hold one layer's active experts.
    prefix_cache: bytes for the prefix cache (None: ``auto_prefix_bytes``, given the bytes of
    ``all_experts`` blobs), taken out of the budget before the experts get the rest."""
    caches = ram - trunk_bytes - kv_reserve - RUNTIME_OVERHEAD
    if prefix_cache is None:  # never what one layer's experts need
        prefix_cache = min(auto_prefix_bytes(caches, all_experts * blob_size), max(0, caches - min_slots * blob_size))
    remaining = caches - prefix_cache
    slots = max(0, remaining // blob_size)
    if slots < min_slots:
        need = trunk_bytes + kv_reserve + RUNTIME_OVERHEAD + prefix_cache + min_slots * blob_size
        prefix = f" + prefix cache {prefix_cache / 2**20:.0f} MiB" if prefix_cache else ""
        raise MoemeshError(
            f"--ram {ram / 2**20:.0f} MiB is too small: trunk {trunk_bytes / 2**20:.0f} MiB + KV reserve "
            f"{kv_reserve / 2**20:.0f} MiB + runtime {RUNTIME_OVERHEAD / 2**20:.0f} MiB{prefix} leave room for {slots} "
            f"experts of {blob_size / 2**20:.1f} MiB but one layer needs {min_slots}; use at least --ram {need / 2**20:.0f}M"
        )
    return BudgetPlan(ram, trunk_bytes, kv_reserve, RUNTIME_OVERHEAD, slots * blob_size, int(slots), prefix_cache)
