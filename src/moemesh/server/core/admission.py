"""Admission control: at most ``limit`` requests waiting or running; the rest get a 429."""
from __future__ import annotations

from ..common.errors import APIError


class Slot:
    """One admitted request; release() is idempotent so every exit path may call it."""

    def __init__(self, owner: Admission) -> None:
        self._owner = owner
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._owner.active -= 1


class Admission:
    """Counts admitted requests; used on the asyncio thread only."""

    def __init__(self, limit: int, retry_after_seconds: int = 1) -> None:
        self.limit = limit
        self.retry_after_seconds = retry_after_seconds
        self.active = 0

    def acquire(self) -> Slot:
        if self.active >= self.limit:
            raise APIError(
                429, f"server is at capacity ({self.active} requests waiting or running, --queue-size "
                f"{self.limit}); retry later", code="queue_full",
                headers={"Retry-After": str(self.retry_after_seconds)},
            )
        self.active += 1
        return Slot(self)
