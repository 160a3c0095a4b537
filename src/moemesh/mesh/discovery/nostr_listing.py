"""Mesh listings on Nostr: a signed, replaceable, expiring event that says "this mesh exists".

Event: kind 31990 (addressable, so a relay keeps only the newest event per author + ``d``),
tags ``["d", mesh_id]``, ``["k", "moemesh"]`` (the filter discovery queries by) and
``["expiration", unix_ts]`` (NIP-40: relays drop it after that; we check it again ourselves).
Content (canonical JSON)::

    {"v": 1, "mesh": NAME, "invite": "moemesh1:...", "open": BOOL,
     "models": {"served": [...], "wanted": [...]}, "nodes": N,
     "capacity": {"ram_bytes": R, "free_bytes": F}}

Secret policy: relays are public, so anyone can read a listing. The mesh secret is the only
thing that gates membership, so a listing's invite carries it only when the operator opened
the mesh on purpose (``--publish``: ``open`` is true). Otherwise the invite has the addresses
and an empty secret: the listing helps members who already hold the secret find live
addresses, and tells others the mesh exists, but joining needs the secret out of band.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from nostr_sdk import Event, EventBuilder, Keys, Kind, Tag, Timestamp

from moemesh.errors import MoemeshError

from .invite import Invite

log = logging.getLogger(__name__)

LISTING_KIND = 31990
LISTING_K = "moemesh"
LISTING_VERSION = 1
MAX_CONTENT_BYTES = 16 * 1024  # a listing is a few hundred bytes; refuse anything huge


class ListingError(MoemeshError, ValueError):
    """An event is not a valid, live moemesh listing; the message is the reason."""


@dataclass(frozen=True)
class ListingContent:
    """What a node advertises. ``invite.secret`` is "" unless the mesh is open (--publish)."""

    mesh_id: str
    invite: Invite
    models_served: list[str] = field(default_factory=list)
    models_wanted: list[str] = field(default_factory=list)
    node_count: int = 1
    ram_bytes: int = 0
    free_bytes: int = 0

    @property
    def mesh_name(self) -> str:
        return self.invite.mesh_name

    @property
    def open(self) -> bool:
        return bool(self.invite.secret)

    def to_json(self) -> str:
        d = {
            "v": LISTING_VERSION,
            "mesh": self.mesh_name,
            "invite": self.invite.encode(),
            "open": self.open,
            "models": {"served": list(self.models_served), "wanted": list(self.models_wanted)},
            "nodes": self.node_count,
            "capacity": {"ram_bytes": self.ram_bytes, "free_bytes": self.free_bytes},
        }
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Listing:
    """A verified listing as discovery sees it: content plus who signed it and when."""

    content: ListingContent
    author: str  # hex public key of the signing node
    created_at: int  # unix seconds
    expires_at: int  # unix seconds
    event_id: str


def memory_capacity(meminfo: str = "/proc/meminfo") -> tuple[int, int]:
    """(total RAM, available RAM) in bytes of this machine; (0, 0) where unknown."""
    vals: dict[str, int] = {}
    try:
        with open(meminfo) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    vals[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return vals.get("MemTotal", 0), vals.get("MemAvailable", 0)


def mesh_id(mesh_name: str, secret: str) -> str:
    """The listing's ``d`` tag: members derive the same id from name + secret; outsiders
    cannot learn the secret from it (SHA-256 of a 192-bit random secret)."""
    h = hashlib.sha256(f"moemesh-listing-v1\0{mesh_name}\0{secret}".encode()).hexdigest()
    return h[:32]


def make_content(mesh_id: str, invite: Invite, publish_secret: bool, **kw) -> ListingContent:
    """The listing content for a mesh; drops the secret unless the operator chose --publish."""
    inv = invite if publish_secret else invite.without_secret()
    return ListingContent(mesh_id=mesh_id, invite=inv, **kw)


def build_event(keys: Keys, content: ListingContent, ttl_s: int, created_at: int | None = None) -> Event:
    """Sign a listing event that expires ``ttl_s`` seconds after ``created_at`` (default now)."""
    if ttl_s <= 0:
        raise ValueError("listing ttl must be positive")
    now = int(time.time()) if created_at is None else int(created_at)
    tags = [
        Tag.identifier(content.mesh_id),
        Tag.custom("k", [LISTING_K]),
        Tag.expiration(Timestamp.from_secs(now + int(ttl_s))),
    ]
    builder = EventBuilder(Kind(LISTING_KIND), content.to_json()).tags(tags)
    return builder.custom_created_at(Timestamp.from_secs(now)).finalize(keys)


def _tag(event: Event, name: str) -> str | None:
    for t in event.tags():
        v = t.to_vec()
        if len(v) >= 2 and v[0] == name:
            return v[1]
    return None


def _str_list(x: object, what: str) -> list[str]:
    if not isinstance(x, list) or not all(isinstance(s, str) and s for s in x) or len(x) > 64:
        raise ListingError(f"{what} must be a list of at most 64 non-empty strings")
    return list(x)


def _count(x: object, what: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise ListingError(f"{what} must be a non-negative integer")
    return x


def parse_content(text: str, mesh_id: str) -> ListingContent:
    """Validate listing JSON; raises ListingError naming the first problem."""
    if len(text.encode("utf-8", "replace")) > MAX_CONTENT_BYTES:
        raise ListingError(f"content larger than {MAX_CONTENT_BYTES} bytes")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ListingError(f"content is not JSON ({e.msg})") from None
    except RecursionError:
        raise ListingError("content is nested too deeply") from None
    if not isinstance(d, dict):
        raise ListingError("content is not a JSON object")
    if d.get("v") != LISTING_VERSION:
        raise ListingError(f"unsupported listing version {d.get('v')!r}")
    for key in ("mesh", "invite", "open", "models", "nodes", "capacity"):
        if key not in d:
            raise ListingError(f"content lacks {key!r}")
    if not isinstance(d["invite"], str):
        raise ListingError("invite must be a string")
    try:
        invite = Invite.decode(d["invite"])
    except ValueError as e:
        raise ListingError(f"bad invite: {e}") from None
    if invite.mesh_name != d["mesh"]:
        raise ListingError(f"invite names mesh {invite.mesh_name!r}, listing names {d['mesh']!r}")
    if d["open"] is not bool(invite.secret):
        raise ListingError("'open' disagrees with whether the invite carries a secret")
    models, cap = d["models"], d["capacity"]
    if not isinstance(models, dict) or not isinstance(cap, dict):
        raise ListingError("models and capacity must be objects")
    nodes = _count(d["nodes"], "nodes")
    if nodes < 1:
        raise ListingError("nodes must be at least 1")
    return ListingContent(
        mesh_id=mesh_id,
        invite=invite,
        models_served=_str_list(models.get("served", []), "models.served"),
        models_wanted=_str_list(models.get("wanted", []), "models.wanted"),
        node_count=nodes,
        ram_bytes=_count(cap.get("ram_bytes", 0), "capacity.ram_bytes"),
        free_bytes=_count(cap.get("free_bytes", 0), "capacity.free_bytes"),
    )


def parse_listing(event: Event, now: float | None = None) -> Listing:
    """Verify signature, kind, tags and expiration, then the content. Raises ListingError."""
    if not event.verify():  # id hash and Schnorr signature; relays may be hostile
        raise ListingError("bad signature or id (tampered event)")
    if event.kind().as_u16() != LISTING_KIND:
        raise ListingError(f"kind {event.kind().as_u16()} is not {LISTING_KIND}")
    if _tag(event, "k") != LISTING_K:
        raise ListingError(f"no ['k', '{LISTING_K}'] tag")
    mesh_id = _tag(event, "d")
    if not mesh_id:
        raise ListingError("no 'd' tag (mesh id)")
    exp_text = _tag(event, "expiration")
    if exp_text is None:
        raise ListingError("no 'expiration' tag (listings must expire)")
    try:
        expires_at = int(exp_text)
    except ValueError:
        raise ListingError(f"expiration {exp_text!r} is not an integer") from None
    now = time.time() if now is None else now
    if expires_at <= now:
        raise ListingError(f"expired {int(now - expires_at)} s ago")
    content = parse_content(event.content(), mesh_id)
    return Listing(content, event.author().to_hex(), event.created_at().as_secs(), expires_at, event.id().to_hex())


def parse_listings(events: list[Event], now: float | None = None) -> list[Listing]:
    """The valid listings among ``events``, newest per (author, mesh id); logs each rejection."""
    best: dict[tuple[str, str], Listing] = {}
    for ev in events:
        try:
            lst = parse_listing(ev, now)
        except ListingError as e:
            log.info("ignoring Nostr event %s: %s", ev.id().to_hex()[:16], e)
            continue
        key = (lst.author, lst.content.mesh_id)
        if key not in best or lst.created_at > best[key].created_at:
            best[key] = lst
    return list(best.values())
