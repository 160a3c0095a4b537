"""How much of a streamed text's tail must be held back because it may be the start of a marker."""
from __future__ import annotations


def partial_suffix_len(text: str, markers: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some marker.

    Streaming parsers keep that tail until the next chunk says whether the marker really follows.
    """
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best
