"""Talking to Nostr relays with bounded waits: connect with retries, fetch, publish.

Every call here ends within a bound computed from its arguments: a relay that refuses,
blackholes or never answers costs at most ``attempts * connect_timeout + backoff`` to connect
and ``timeout`` per fetch/send, and is then reported by URL (RelayUnreachable) instead of
hanging or raising a traceback. nostr-sdk's client would otherwise wait 10 s per send to a dead
relay and keep reconnecting in the background.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from nostr_sdk import Client, Event, Filter, RelayUrl, ReqTarget, SendEventTarget

from moemesh.errors import MoemeshError

log = logging.getLogger(__name__)

# Public relays used when the operator names none (discovery in the wild, never in tests).
DEFAULT_RELAYS = ("wss://relay.damus.io", "wss://nos.lol", "wss://relay.primal.net")


class RelayUnreachable(MoemeshError):
    """No relay could be reached; the message names each relay and why."""


@dataclass(frozen=True)
class RetryPolicy:
    """Connect attempts with exponential backoff: delays base, 2*base, ... capped at max_delay."""

    attempts: int = 4
    connect_timeout_s: float = 3.0
    base_delay_s: float = 0.5
    max_delay_s: float = 4.0

    def delays(self) -> list[float]:
        return [min(self.base_delay_s * 2**i, self.max_delay_s) for i in range(max(self.attempts - 1, 0))]

    def worst_case_s(self) -> float:
        return self.attempts * self.connect_timeout_s + sum(self.delays())


def parse_relay_urls(urls: list[str] | tuple[str, ...]) -> list[RelayUrl]:
    out = []
    for u in urls:
        if not (u.startswith("ws://") or u.startswith("wss://")):
            raise MoemeshError(f"relay URL {u!r} must start with ws:// or wss://")
        try:
            out.append(RelayUrl.parse(u))
        except Exception as e:  # nostr_sdk's error carries only a terse reason
            raise MoemeshError(f"bad relay URL {u!r}: {e}") from None
    return out


async def connect(urls: list[str] | tuple[str, ...], policy: RetryPolicy = RetryPolicy()) -> tuple[Client, list[RelayUrl]]:
    """A client connected to the reachable relays of ``urls``. While none connects, retries
    with exponential backoff; raises RelayUnreachable after the last attempt. Relays that fail
    while others work are logged and dropped."""
    relays = parse_relay_urls(urls)
    if not relays:
        raise MoemeshError("no Nostr relay given")
    client = Client()
    pending = {str(r): r for r in relays}
    connected: list[RelayUrl] = []
    errors: dict[str, str] = {}
    delays = policy.delays()
    for attempt in range(policy.attempts):
        for url in pending.values():
            await client.add_relay(url)
        out = await client.try_connect(timedelta(seconds=policy.connect_timeout_s))
        for url in out.success:
            if str(url) in pending:
                connected.append(pending.pop(str(url)))
        errors = {str(u): str(msg) for u, msg in out.failed.items()}
        for key in list(pending):
            errors.setdefault(key, "no answer")
            # Drop the failed relay so the SDK does not keep reconnecting (or stall a fetch on it).
            await client.remove_relay(pending[key], force=True)
        if connected:  # at least one relay works: do not hold the caller up for the rest
            break
        if attempt < len(delays):
            log.info("Nostr relay(s) unreachable (%s); retry %d/%d in %.1f s",
                     _describe(errors), attempt + 1, policy.attempts - 1, delays[attempt])
            await asyncio.sleep(delays[attempt])
    if not connected:
        await client.shutdown()
        raise RelayUnreachable(
            f"cannot reach any Nostr relay after {policy.attempts} attempt(s): {_describe(errors)}"
        )
    if pending:
        log.warning("skipping unreachable Nostr relay(s): %s", _describe(errors))
    return client, connected


def _describe(errors: dict[str, str]) -> str:
    return "; ".join(f"{u} ({m})" for u, m in errors.items())


async def fetch(client: Client, relays: list[RelayUrl], filt: Filter, timeout_s: float) -> list[Event]:
    """Events matching ``filt`` from the connected relays; returns what arrived by the timeout."""
    target = ReqTarget.manual({r: [filt] for r in relays})
    coro = client.fetch_events(target, timedelta(seconds=timeout_s))
    try:
        # The SDK honours its own timeout; wait_for is the backstop so we can never hang.
        return await asyncio.wait_for(coro, timeout_s + 2.0)
    except TimeoutError:
        log.warning("Nostr fetch did not finish in %.1f s", timeout_s)
        return []


async def send(client: Client, relays: list[RelayUrl], event: Event, timeout_s: float) -> list[str]:
    """Publish ``event`` to the connected relays; returns the URLs that accepted it."""
    coro = client.send_event(event, SendEventTarget.to(relays), ok_timeout=timedelta(seconds=timeout_s))
    try:
        out = await asyncio.wait_for(coro, timeout_s + 2.0)
    except TimeoutError:
        log.warning("Nostr publish did not finish in %.1f s", timeout_s)
        return []
    for url, msg in out.failed.items():
        log.warning("relay %s refused listing: %s", url, msg)
    return [str(u) for u in out.success]
