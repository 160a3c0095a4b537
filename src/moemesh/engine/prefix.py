"""How the engine uses a PrefixCache (kvcache/prefix_cache.py).

* Admission: a sequence's prompt is looked up; the cached blocks (and, for TurboQuant, the exact
  window saved with the last one) are copied into its fresh KV state and its prefill starts after
  them. At least the prompt's last token is always computed (the first sample needs its logits).
* Chunks: with a TurboQuant cache, prefill chunks end on block boundaries (and at the last one
  before the prompt's last token, where the same prompt asked again is restored), so the cache's
  state after a chunk is a block boundary's state and its exact window can be saved there. The
  dense cache needs no boundary (a block is just rows): its chunks are the engine's usual ones.
* Inserts: after every step, a sequence whose computed tokens fill new blocks inserts them -
  prompt and generated tokens alike, so an agent's next turn, which repeats the previous answer,
  finds it. TurboQuant also saves the exact window (the tail) when the step ended on a boundary:
  kept at prefill chunk ends; while decoding, only the sequence's latest one is kept.

Exactness: a restored sequence continues from the bits the exporter had, so its logits equal
those of a run that prefilled the prompt with a chunk boundary at the hit (for the dense cache
and batch-invariant matmuls - dense fp32, int4 - that is any run; tests/test_prefix_cache.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..experts.budget import PREFIX_AUTO_MAX, BudgetPlan
from ..kvcache.base import KVCache
from ..kvcache.prefix_cache import DEFAULT_BLOCK, PrefixCache
from ..kvcache.prompt_store import PromptStore
from .sequence import Sequence


@dataclass
class _State:
    keys: list[bytes] = field(default_factory=list)  # block keys of the sequence's tokens so far
    saved: int = 0  # blocks known to be in the cache (inserted or restored)
    split_at: int = 0  # a prefill chunk ends here (a TurboQuant match without a tail: save one)
    decode_tail: bytes | None = None  # the block whose tail this sequence attached while decoding


class PrefixReuse:
    def __init__(self, cache: PrefixCache, kv: KVCache) -> None:
        self.cache, self.kv = cache, kv
        self.block = cache.block_size
        self._states: dict[int, _State] = {}

    def restore(self, seq: Sequence) -> None:
        """Right after ``kv.add_sequence``: restore the longest cached prefix of the prompt."""
        st = self._states.setdefault(seq.seq_id, _State())
        ids = seq.prompt_ids
        hit = self.cache.lookup(ids, len(ids) - 1, st.keys)
        if hit.tokens:
            seq.num_computed = self.kv.import_prefix(seq.seq_id, hit.blocks, hit.tail)
            seq.cached_tokens = hit.tokens
        st.saved = hit.tokens // self.block
        if hit.matched > hit.tokens:
            st.split_at = hit.matched

    def chunk(self, seq: Sequence, budget: int) -> list[int]:
        """The next prefill chunk; for a cache with tails, ending on a block boundary unless it ends
        the prompt."""
        if not self.kv.needs_tail:
            return seq.next_chunk(budget)
        start, n = seq.num_computed, len(seq.prompt_ids)
        end = min(n, start + max(1, budget))
        # the last boundary before the prompt's last token: where the same prompt, asked again,
        # is restored (a TurboQuant restore needs the window saved at that very point)
        last_full = (n - 1) - (n - 1) % self.block
        for stop in (self._states[seq.seq_id].split_at, last_full):
            if start < stop < end:
                end = stop
        if end < n and end - end % self.block > start:
            end -= end % self.block
        return seq.all_ids[start:end]

    def after_step(self, seqs: list[Sequence], was_prefill: list[bool]) -> None:
        """Insert the blocks each sequence completed in this step (before any is freed)."""
        b = self.block
        for seq, prefill in zip(seqs, was_prefill):
            n = seq.num_computed
            st = self._states[seq.seq_id]
            nb = n // b
            if nb <= st.saved:
                continue
            ids = seq.all_ids
            self.cache.extend_keys(ids, st.keys, nb)
            first = self.cache.first_missing(st.keys, st.saved, nb)
            data = self.kv.export_blocks(seq.seq_id, first * b, nb * b, b) if first < nb else []
            tail = self.kv.export_tail(seq.seq_id) if self.kv.needs_tail and n == nb * b else None
            attached = self.cache.insert(ids, st.keys, first, data, tail, stop=nb)
            if attached and not prefill:  # decoding: only the latest tail of a sequence is kept
                if st.decode_tail is not None:
                    self.cache.set_tail(st.decode_tail, None)
                st.decode_tail = st.keys[nb - 1]
            st.saved = nb

    def forget(self, seq: Sequence) -> None:
        self._states.pop(seq.seq_id, None)


def open_prefix_cache(kv: KVCache, requested: int | None, budget: BudgetPlan | None = None,
                      identity: dict | None = None, prompt_dir: str | None = None, disk_bytes: int = 8 * 2**30,
                      block_size: int = DEFAULT_BLOCK) -> PrefixCache | None:
    """The engine's PrefixCache for ``kv``, or None when off (or the cache cannot export blocks).
    requested: bytes (None: auto, 0: off); under --ram the budget planned its bytes (``budget``),
    else auto is PREFIX_AUTO_MAX. Backed by files under ``prompt_dir`` (``--prompt-cache``) when
    given, keyed by ``identity`` (loading/kv_identity.py)."""
    if budget is not None:
        capacity = budget.prefix_cache
    else:
        capacity = PREFIX_AUTO_MAX if requested is None else requested
    if capacity <= 0 or not kv.supports_prefix:
        return None
    namespace = json.dumps(identity or {}, sort_keys=True, default=str).encode()
    cache = PrefixCache(kv, capacity, block_size, namespace)
    if prompt_dir is not None:
        cache.store = PromptStore(prompt_dir, cache.root, kv.block_spec, kv.tail_spec, identity, disk_bytes)
    return cache
