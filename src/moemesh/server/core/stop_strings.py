"""Stop strings over streamed text: emit only what cannot be the start of a stop string."""
from __future__ import annotations

from ...tokenizer.formats.holdback import partial_suffix_len


class StopMatcher:
    """feed(text) -> text safe to emit; cuts at the first stop string, which is never emitted.

    After a match, ``matched`` names the stop string and every later feed returns "".
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        buf = self._held + text
        hit: tuple[int, int, str] | None = None  # (position, -length, stop): earliest, then longest
        for stop in self._stops:
            i = buf.find(stop)
            if i >= 0 and (hit is None or (i, -len(stop)) < hit[:2]):
                hit = (i, -len(stop), stop)
        if hit is not None:
            self.matched = hit[2]
            self._held = ""
            return buf[: hit[0]]
        keep = partial_suffix_len(buf, self._stops)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail: generation ended, so it was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held
