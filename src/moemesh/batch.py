"""BatchLayout: how the flat token axis of one forward pass splits into sequences."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BatchLayout:
    """Tokens of several sequences laid end to end on one axis (T = sum(query_lens)).

    Invariant: sequence i owns tokens [offsets[i], offsets[i] + query_lens[i]) and those tokens
    continue its KV cache: they are written after the cache's current length, or, with ``starts``,
    at positions [starts[i], starts[i] + query_lens[i]) of a sequence whose length ``end`` has not
    advanced yet (layer-major prefill feeds one layer's chunks before the next layer's: caches that
    support it say so with ``KVCache.supports_starts``).
    """

    seq_ids: list[int]
    query_lens: list[int]
    starts: list[int] | None = None
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.seq_ids) != len(self.query_lens) or (self.starts is not None and len(self.starts) != len(self.seq_ids)):
            raise ValueError("seq_ids, query_lens (and starts) differ in length")
        offsets, total = [], 0
        for n in self.query_lens:
            offsets.append(total)
            total += n
        self.offsets = offsets

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def last_token_indices(self) -> list[int]:
        return [o + n - 1 for o, n in zip(self.offsets, self.query_lens)]
