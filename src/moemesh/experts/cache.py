"""ExpertCache: a fixed pool of slots in one anonymous mapping, keyed by (layer, expert).

Memory is bounded by construction (num_slots * slot size, page-aligned for O_DIRECT) and only
becomes resident as slots are first written. Entries being read or pinned by the running layer
are never evicted; the eviction policy picks among the rest. Where the experts come from is the
ExpertSource's business (store/expert_source.py: an expert store, or the model's own file).
"""
from __future__ import annotations

import logging
import mmap
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, MoemeshError
from ..layers.mlp import GatedMLP
from ..store.expert_source import ExpertSource
from .io import BlobReader
from .policy import EvictionPolicy, Key

log = logging.getLogger("moemesh.experts")


@dataclass
class Entry:
    key: Key
    slot: int
    future: Future | None  # the read in flight, None once consumed
    expert: GatedMLP | None = None
    pins: int = 0
    prefetched: bool = False  # loaded by prefetch and not used yet


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0  # demanded experts that a prefetch had already brought in
    stall_seconds: float = 0.0
    read_retries: int = 0  # failed expert reads (I/O error, short read, checksum) read again into their slot
    read_failures: int = 0  # of those, reads that failed again: the request got an error naming the expert
    extra: dict = field(default_factory=dict)


class ExpertCache:
    def __init__(self, source: ExpertSource, num_slots: int, policy: EvictionPolicy, reader: BlobReader,
                 verify: bool = True) -> None:
        if num_slots < 1:
            raise MoemeshError("expert cache needs at least one slot")
        self.source, self.policy, self.reader, self.verify = source, policy, reader, verify
        self.store = source  # older name
        self.num_slots = num_slots
        self.blob_size = source.slot_bytes
        # page-aligned, lazily backed, private (MADV_DONTNEED gives a lent slot's pages back; shared anonymous
        # memory would keep them). Not advised onto huge pages: where THP cannot find them (this Xeon guest:
        # AnonHugePages stayed 0) MADV_HUGEPAGE made first touches 6x slower (0.34 vs 2.0 GB/s, 2 GiB touched).
        # A slot's first fill costs its page faults (~2 GB/s here), which a run shorter than the cache's fill
        # time pays on every read (gpt-oss-120b at 16 GiB: ~1 s of a token's 3.3 s)
        self._mem = mmap.mmap(-1, num_slots * self.blob_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = memoryview(self._mem)
        self._tensor = torch.frombuffer(self._mem, dtype=torch.uint8)  # [slots * slot bytes]
        # with a fixed layout (an expert store) each slot's expert is built once as views over the
        # slot: a read into the slot is all it takes to turn it into another expert
        self.slot_experts: list[GatedMLP | None] = [None] * num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.entries: dict[Key, Entry] = {}
        self.stats = CacheStats()
        # slots lent to other working memory (a long prompt's KV cache and activations: engine/memory.py),
        # their pages given back to the kernel; num_slots counts only the usable ones
        self.capacity = num_slots
        self.lent: list[int] = []
        self.min_slots = 1  # never lend below this (loading sets the model's top-k)
        # working memory --ram set aside at load for KV and activations (loading sets it); None: no --ram,
        # nothing is lent
        self.reserve_bytes: int | None = None
        self.prefix_bytes = 0  # the prefix cache's share of --ram (a prompt's KV may take it: engine/memory.py)

    def slot_view(self, slot: int) -> memoryview:
        return self._view[slot * self.blob_size : (slot + 1) * self.blob_size]

    def _idle(self, key: Key, protect: set[Key]) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.pins == 0 and key not in protect

    def _take_slot(self, protect: set[Key], may_wait: bool = True) -> int | None:
        """A free slot, or one evicted by the policy among unpinned, unprotected entries. Reads
        still in flight only when ``may_wait`` and nothing else is left: a mispredicted prefetch
        must not block a demanded expert, and a prefetch must never wait."""
        if self.free_slots:
            return self.free_slots.pop()
        victim = self.policy.victim_where(
            lambda k: self._idle(k, protect) and (self.entries[k].future is None or self.entries[k].future.done()))
        if victim is None and may_wait:
            victim = self.policy.victim_where(lambda k: self._idle(k, protect))
        if victim is None:
            return None
        entry = self.entries.pop(victim)
        if entry.future is not None:
            entry.future.exception()  # wait until the slot is no longer being written; a failed
            # read of an unused prefetch is dropped: a demand for that expert reads and checks it again
        self.policy.forget(victim)
        return entry.slot

    def _load(self, key: Key, protect: set[Key], may_wait: bool = True) -> Entry | None:
        slot = self._take_slot(protect, may_wait)
        if slot is None:
            return None
        entry = Entry(key, slot, self._submit(key, slot))
        self.entries[key] = entry
        self.policy.insert(key)
        return entry

    def _submit(self, key: Key, slot: int) -> Future:
        layer, expert = key
        finish = lambda data: self.source.finish(layer, expert, data, self.verify)  # noqa: E731
        return self.reader.submit_spans(self.source.spans(layer, expert), self.slot_view(slot), finish)

    def acquire(self, keys: list[Key]) -> list[Entry]:
        """Pin every key (issuing all misses at once); len(keys) must not exceed num_slots."""
        if len(keys) > self.num_slots:
            raise MoemeshError(f"{len(keys)} experts requested at once but the cache has {self.num_slots} slots")
        protect = set(keys)
        out = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                self.stats.misses += 1
                entry = self._load(key, protect)
                if entry is None:
                    raise MoemeshError("expert cache: no slot free (all pinned)")
            else:
                self.stats.hits += 1
                if entry.prefetched:
                    self.stats.prefetch_hits += 1
            entry.prefetched = False
            entry.pins += 1
            self.policy.touch(key)
            out.append(entry)
        return out

    def prefetch(self, keys: list[Key], protect: set[Key]) -> int:
        """Start reads for keys not cached, into free slots or evictable ones outside ``protect``.
        Returns how many reads were issued."""
        issued = 0
        for key in keys:
            if key in self.entries:
                continue
            entry = self._load(key, protect | set(keys), may_wait=False)
            if entry is None:
                break
            entry.prefetched = True
            issued += 1
        self.stats.prefetch_issued += issued
        return issued

    def expert(self, entry: Entry) -> GatedMLP:
        """Wait for the entry's read and checksum (counted as stall time); the slot's expert."""
        if entry.future is not None:
            t0 = time.perf_counter()
            try:
                self._wait_read(entry)
            finally:
                self.stats.stall_seconds += time.perf_counter() - t0
            entry.future = None
            entry.expert = self._slot_expert(entry)
        return entry.expert

    def _wait_read(self, entry: Entry) -> None:
        """A read that failed (EIO, a short read, a checksum mismatch: bytes that changed on disk) is
        read once more into the same slot, so a retry never takes memory beyond the cache; failing
        again, the entry is dropped (never served, its slot free) and the error names layer and expert."""
        assert entry.future is not None
        try:
            entry.future.result()
            return
        except Exception as exc:
            first = exc
        self.stats.read_retries += 1
        log.warning("layer %d expert %d: read failed (%s); reading it again", *entry.key, first)
        entry.future = self._submit(entry.key, entry.slot)
        try:
            entry.future.result()
        except Exception as exc:
            self.stats.read_failures += 1
            self.entries.pop(entry.key, None)  # never serve a half-read or corrupt blob
            self.policy.forget(entry.key)
            self.free_slots.append(entry.slot)
            entry.future = None
            if isinstance(exc, CheckpointError):  # a checksum mismatch: it already names layer and expert
                raise
            files = sorted({str(self.source.files[s.file]) for s in self.source.spans(*entry.key)})
            raise CheckpointError(f"{', '.join(files)}: reading layer {entry.key[0]} expert {entry.key[1]} failed "
                                  f"twice ({type(exc).__name__}: {exc}); the disk or file is failing") from None

    def _slot_expert(self, entry: Entry) -> GatedMLP:
        slot = entry.slot
        if self.source.fixed_layout and self.slot_experts[slot] is not None:
            return self.slot_experts[slot]  # type: ignore[return-value]
        buf = self._tensor[slot * self.blob_size : (slot + 1) * self.blob_size]
        module = self.source.expert_at(slot, buf, *entry.key)
        if self.source.fixed_layout:
            self.slot_experts[slot] = module
        return module

    def release(self, entries: list[Entry]) -> None:
        for entry in entries:
            entry.pins -= 1

    def nbytes(self) -> int:
        return self.num_slots * self.blob_size

    def limit(self, slots: int) -> int:
        """Make ``slots`` slots usable (clamped to [min_slots, capacity]): fewer lends the rest out,
        evicting idle entries (pinned ones and reads in flight stay) and giving their pages back to the
        kernel, so the process's memory drops by their bytes; more takes lent slots back. Returns the
        usable count reached."""
        target = max(self.min_slots, min(self.capacity, slots))
        while self.num_slots > target:
            slot = self._take_slot(set(), may_wait=False)
            if slot is None:
                break  # the rest are pinned or being read: lent later, when the engine asks again
            self._give_back_pages(slot)
            self.slot_experts[slot] = None
            self.lent.append(slot)
            self.num_slots -= 1
        while self.num_slots < target and self.lent:
            self.free_slots.append(self.lent.pop())
            self.num_slots += 1
        return self.num_slots

    def _give_back_pages(self, slot: int) -> None:
        # private anonymous memory: MADV_DONTNEED frees the pages (a later fill faults in zeroed ones)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is not None:
            self._mem.madvise(advice, slot * self.blob_size, self.blob_size)
