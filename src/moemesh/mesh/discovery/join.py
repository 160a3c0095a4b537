"""Find meshes on Nostr relays and pick one to join (``--auto``), or say to start a new one.

Score of a listing (higher is better), each term in [0, 1]:
  4 * model    1 if the mesh serves the wanted model, 0.5 if it lists it as wanted (it is
               gathering nodes for it), else the listing does not fit; 0 with no model asked
  2 * capacity free memory of the mesh, log-scaled, saturating at 64 GiB
  1 * nodes    node count, log-scaled, saturating at 16 (a bigger mesh is likelier to be alive)
  1 * fresh    1 just published, falling to 0 at its expiration
A listing fits ``--auto`` only if it is joinable: open (its invite carries the secret) or we
already know that mesh's secret.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass

from nostr_sdk import Filter

from . import nostr_relays
from .invite import Invite
from .nostr_listing import LISTING_K, LISTING_KIND, Listing, parse_listings

log = logging.getLogger(__name__)

W_MODEL, W_CAPACITY, W_NODES, W_FRESH = 4.0, 2.0, 1.0, 1.0
CAPACITY_SATURATION_GIB = 64.0
NODES_SATURATION = 16


@dataclass(frozen=True)
class Scored:
    listing: Listing
    score: float
    fits: bool
    why: str  # why it does not fit, or "" when it does


def listing_filter(limit: int = 500) -> Filter:
    return Filter.from_json(f'{{"kinds":[{LISTING_KIND}],"#k":["{LISTING_K}"],"limit":{int(limit)}}}')


def model_matches(wanted: str, offered: str) -> bool:
    """Case-insensitive match on the full name or the last path component (org/Name)."""
    w, o = wanted.strip().lower(), offered.strip().lower()
    return w == o or w.rsplit("/", 1)[-1] == o.rsplit("/", 1)[-1]


def score(listing: Listing, model: str | None, now: float, known_secrets: dict[str, str] | None = None) -> Scored:
    c = listing.content
    if model:
        if any(model_matches(model, m) for m in c.models_served):
            m = 1.0
        elif any(model_matches(model, m) for m in c.models_wanted):
            m = 0.5
        else:
            m = 0.0
    else:
        m = 0.0
    gib = c.free_bytes / 2**30
    cap = min(1.0, math.log2(1 + gib) / math.log2(1 + CAPACITY_SATURATION_GIB))
    nodes = min(1.0, math.log2(1 + c.node_count) / math.log2(1 + NODES_SATURATION))
    life = max(listing.expires_at - listing.created_at, 1)
    fresh = min(1.0, max(0.0, (listing.expires_at - now) / life))
    total = W_MODEL * m + W_CAPACITY * cap + W_NODES * nodes + W_FRESH * fresh
    why = ""
    if model and m == 0.0:
        why = f"does not serve or want {model}"
    elif not (c.open or (known_secrets or {}).get(c.mesh_name)):
        why = "private (its invite has no secret)"
    return Scored(listing, total, not why, why)


def rank(listings: list[Listing], model: str | None, now: float | None = None,
         known_secrets: dict[str, str] | None = None) -> list[Scored]:
    """All listings scored, fitting ones first, best first."""
    now = time.time() if now is None else now
    scored = [score(lst, model, now, known_secrets) for lst in listings]
    return sorted(scored, key=lambda s: (s.fits, s.score, s.listing.created_at), reverse=True)


def pick_best(listings: list[Listing], model: str | None, now: float | None = None,
              known_secrets: dict[str, str] | None = None) -> Scored | None:
    """The best fitting listing, or None: start a new mesh."""
    ranked = rank(listings, model, now, known_secrets)
    return ranked[0] if ranked and ranked[0].fits else None


def invite_for(choice: Scored, known_secrets: dict[str, str] | None = None) -> Invite:
    inv = choice.listing.content.invite
    if inv.secret:
        return inv
    return Invite(inv.mesh_name, (known_secrets or {})[inv.mesh_name], list(inv.addrs))


async def fetch_listings(relays: list[str] | tuple[str, ...], timeout_s: float = 5.0,
                         policy: nostr_relays.RetryPolicy = nostr_relays.RetryPolicy()) -> list[Listing]:
    """Valid, unexpired listings from the relays. Raises RelayUnreachable (clear message)
    if no relay answers after bounded retries."""
    client, connected = await nostr_relays.connect(relays, policy)
    try:
        events = await nostr_relays.fetch(client, connected, listing_filter(), timeout_s)
    finally:
        await client.shutdown()
    return parse_listings(events)


def run_sync(coro):
    """Run a coroutine to completion from sync code, even if this thread already runs a loop
    (the mesh node's): then it runs on a fresh loop in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out: dict = {}

    def target() -> None:
        try:
            out["v"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            out["e"] = e

    t = threading.Thread(target=target, name="nostr-discovery")
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["v"]


def discover(relays: list[str] | tuple[str, ...], timeout_s: float = 5.0,
             policy: nostr_relays.RetryPolicy = nostr_relays.RetryPolicy()) -> list[Listing]:
    return run_sync(fetch_listings(relays, timeout_s, policy))


def auto_join(relays: list[str] | tuple[str, ...] = nostr_relays.DEFAULT_RELAYS, model: str | None = None,
              timeout_s: float = 5.0, known_secrets: dict[str, str] | None = None,
              policy: nostr_relays.RetryPolicy = nostr_relays.RetryPolicy()) -> Invite | None:
    """The invite of the best mesh to join for ``model``, or None (start a new mesh).
    Unreachable relays are logged and also give None: a node can always start its own mesh."""
    try:
        listings = discover(relays, timeout_s, policy)
    except nostr_relays.RelayUnreachable as e:
        log.warning("mesh discovery failed, starting a new mesh: %s", e)
        return None
    best = pick_best(listings, model, known_secrets=known_secrets)
    if best is None:
        log.info("no fitting mesh among %d listing(s): start a new mesh", len(listings))
        return None
    c = best.listing.content
    log.info("joining mesh %r (%d node(s), score %.2f)", c.mesh_name, c.node_count, best.score)
    return invite_for(best, known_secrets)

