"""The KV-cache interface. The cache owns attention, so a compressed cache (TurboQuant) can
compute scores straight from its codes instead of handing back dense K and V."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..batch import BatchLayout


class KVCache(ABC):
    """Per-sequence keys and values for every layer.

    Protocol for one forward pass: ``begin(batch)``, then ``attend(layer, ...)`` once per layer
    (it appends that layer's new k/v after the sequence's current length and attends causally
    over everything up to them), then ``end(batch)`` advances each sequence's length. A cache with
    ``supports_starts`` also honours ``batch.starts`` (write and attend at explicit positions before
    ``end``), which layer-major prefill needs.
    """

    supports_starts: bool = False

    @abstractmethod
    def add_sequence(self, seq_id: int) -> None: ...

    @abstractmethod
    def free_sequence(self, seq_id: int) -> None: ...

    @abstractmethod
    def length(self, seq_id: int) -> int: ...

    def begin(self, batch: BatchLayout) -> None:
        """Make room for the batch's new tokens (before any layer runs)."""

    @abstractmethod
    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: BatchLayout,
        scale: float,
        window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, Dh], k: [T, Hkv, Dh], v: [T, Hkv, Dv] (RoPE applied) -> attention output
        [T, Hq, Dv]. Dv may differ from Dh (MLA). A cache built with ``values_in_keys`` takes
        v=None: each value is the first Dv coordinates of its key and is not stored separately.
        sinks: [Hq] per-head logits added to the softmax denominator only (gpt-oss), or None."""

    @abstractmethod
    def end(self, batch: BatchLayout) -> None:
        """Advance every sequence of the batch by its query length."""

    def nbytes(self) -> int:
        """Bytes held by the cache's buffers."""
        return 0

    # ---------------------------------------------------------------- one-token decode in a compiled graph
    def decode_buffers(self, seq_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """For a compiled decode step of ``seq_id`` (one token): the per-layer key and value buffers the
        step writes and reads, with room for the new token (grown if needed), as ``decode_view`` takes
        them; or None when this cache has no such form (the step then runs eagerly). Call ``begin``
        first and ``end`` after the step, as for any forward pass."""
        return None

    def decode_view(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos: torch.Tensor) -> KVCache:
        """A KVCache over ``decode_buffers``' tensors for one token at position ``pos`` ([1] int64, the
        sequence's length), built inside the traced step: its ``attend`` is what the model's attention
        layers call there."""
        raise NotImplementedError(f"{type(self).__name__} has no one-token view")
    def bytes_per_token(self) -> int:
        """Bytes one more cached token costs once it has settled (all layers; dense: keys and
        values, TurboQuant: codes and norms): the figure that decides how many tokens fit."""
        raise NotImplementedError(f"{type(self).__name__} does not report its bytes per token")

    # -- prefix reuse (kvcache/prefix_cache.py): a cache that supports it overrides these --------
    # Blocks are plain dicts of tensors (the cache's own format, all layers stacked), so the prefix
    # cache can hold, count and persist them without knowing what they mean.
    supports_prefix = False  # export_blocks / import_prefix implemented
    needs_tail = False  # True: a prefix can only be restored where a tail was exported (TurboQuant)

    def export_blocks(self, seq_id: int, start: int, end: int, size: int) -> list[dict[str, torch.Tensor]]:
        """Copies of tokens [start, end) of a sequence, one dict per ``size`` tokens (start and
        end multiples of size, end <= length)."""
        raise NotImplementedError(f"{type(self).__name__} cannot export prefix blocks")

    def export_tail(self, seq_id: int) -> dict[str, torch.Tensor] | None:
        """What, beyond the blocks, restoring the sequence at its current length needs (None: nothing)."""
        return None

    def import_prefix(self, seq_id: int, blocks: list[dict[str, torch.Tensor]],
                      tail: dict[str, torch.Tensor] | None) -> int:
        """Fill a freshly added (empty) sequence with exported blocks (and the tail of the last
        one when ``needs_tail``); returns its new length. The state equals the exporter's at that
        length bit for bit."""
        raise NotImplementedError(f"{type(self).__name__} cannot import prefix blocks")

    def block_spec(self, size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape) of an exported block of ``size`` tokens (checks persisted blocks)."""
        raise NotImplementedError(f"{type(self).__name__} cannot export prefix blocks")

    def tail_spec(self, length: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape) of the tail exported at ``length`` tokens ({} without tails)."""
        return {}


def causal_mask(n: int, start: int, window: int | None) -> torch.Tensor | None:
    """Bool mask [n, start + n]: query i (absolute position start + i) sees keys j <= start + i
    (and j > start + i - window with a sliding window). None when no key is hidden."""
    total = start + n
    if n == 1 and (window is None or total <= window):
        return None
    qpos = torch.arange(start, total)[:, None]  # [n, 1]
    kpos = torch.arange(total)[None, :]  # [1, L]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask
