"""Keeps this node's mesh listing alive on Nostr relays: republish every ``interval_s``.

Each round signs a fresh event (new created_at, expiration = created_at + ttl) from
``content_fn()``, so node count and free memory stay current and a relay replaces the previous
listing (same author, kind and ``d``). The ttl defaults to 3 intervals: one missed round does
not make the mesh vanish, and a dead node's listing disappears within a few minutes.
Runs as an asyncio task (``run``) or in its own thread (``start_thread``) for sync callers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from nostr_sdk import Keys

from moemesh.errors import MoemeshError

from . import nostr_relays
from .invite import Invite
from .nostr_keys import load_or_create_keys
from .nostr_listing import ListingContent, build_event, make_content, memory_capacity, mesh_id

log = logging.getLogger(__name__)


class ListingPublisher:
    def __init__(
        self,
        keys: Keys,
        relays: list[str],
        content_fn: Callable[[], ListingContent],
        interval_s: float = 60.0,
        ttl_s: int | None = None,
        send_timeout_s: float = 5.0,
        policy: nostr_relays.RetryPolicy = nostr_relays.RetryPolicy(),
    ) -> None:
        if interval_s <= 0:
            raise ValueError("publish interval must be positive")
        self.keys = keys
        self.relays = list(relays)
        self.content_fn = content_fn
        self.interval_s = interval_s
        self.ttl_s = ttl_s if ttl_s is not None else max(int(3 * interval_s), 2)
        self.send_timeout_s = send_timeout_s
        self.policy = policy
        self.published = 0  # rounds that at least one relay accepted
        self._stop = threading.Event()
        self._last_created = 0
        self._thread: threading.Thread | None = None

    def _next_created_at(self) -> int:
        # Relays replace an addressable event only with a strictly newer created_at (seconds).
        self._last_created = max(int(time.time()), self._last_created + 1)
        return self._last_created

    async def publish_once(self, client, connected) -> list[str]:
        event = build_event(self.keys, self.content_fn(), self.ttl_s, self._next_created_at())
        ok = await nostr_relays.send(client, connected, event, self.send_timeout_s)
        if ok:
            self.published += 1
        return ok

    async def run(self) -> None:
        """Publish until stop(); a relay outage is logged and retried next round, never raised."""
        client = None
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client, connected = await nostr_relays.connect(self.relays, self.policy)
                    if not await self.publish_once(client, connected):
                        log.warning("no relay accepted the mesh listing this round")
                        await client.shutdown()
                        client = None  # reconnect next round
                except MoemeshError as e:
                    log.warning("mesh listing not published: %s", e)
                    client = None
                # Wait in a worker thread so stop() from any thread wakes us at once.
                await asyncio.to_thread(self._stop.wait, self.interval_s)
        finally:
            if client is not None:
                await client.shutdown()

    def start_thread(self) -> "ListingPublisher":
        self._thread = threading.Thread(target=lambda: asyncio.run(self.run()), name="nostr-listing", daemon=True)
        self._thread.start()
        return self

    def stop(self, join_timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(join_timeout_s)


def start_mesh_listing(
    relays: list[str],
    invite_fn: Callable[[], Invite],
    publish_secret: bool,
    models_served: list[str],
    models_wanted: list[str] | None = None,
    node_count_fn: Callable[[], int] = lambda: 1,
    interval_s: float = 60.0,
    key_path: str | None = None,
) -> ListingPublisher:
    """For ``mesh serve --nostr-relay ...``: publish this node's listing in a background thread
    until ``.stop()``. ``invite_fn`` gives the current invite (name, secret, live addrs); the
    secret goes into the listing only with ``publish_secret`` (the operator's --publish)."""
    keys = load_or_create_keys(key_path)

    def content() -> ListingContent:
        inv = invite_fn()
        ram, free = memory_capacity()
        return make_content(
            mesh_id(inv.mesh_name, inv.secret), inv, publish_secret,
            models_served=list(models_served), models_wanted=list(models_wanted or []),
            node_count=max(int(node_count_fn()), 1), ram_bytes=ram, free_bytes=free,
        )

    return ListingPublisher(keys, relays, content, interval_s=interval_s).start_thread()
