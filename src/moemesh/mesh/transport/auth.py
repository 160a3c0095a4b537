"""Mesh membership proof: peers prove knowledge of the mesh secret once, then are allowlisted.

The P2P daemon authenticates peer ids (libp2p keys) but has no notion of a mesh, so:

1. the caller sends ``hello`` with a fresh nonce; the callee answers with its own nonce and a
   proof ``HMAC(key, "server" | caller_nonce | callee_id | caller_id)``: the caller now knows the
   callee holds the secret (no activation is ever sent to an outsider);
2. the caller sends ``HMAC(key, "client" | callee_nonce | caller_id | callee_id)``; the callee
   checks it and allowlists the caller's peer id.

Proofs bind both peer ids (which libp2p authenticates), so a proof cannot be replayed by another
peer. Every other handler calls ``Allowlist.check(context.remote_id)`` first.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time

HELLO = "moemesh.auth.hello"
PROVE = "moemesh.auth.prove"
NONCE_BYTES = 16
PENDING_TTL = 30.0  # seconds a server nonce stays valid


class NotAMember(PermissionError):
    """The calling peer has not proven knowledge of the mesh secret."""


def mesh_key(mesh_name: str, secret: str) -> bytes:
    """The HMAC key of a mesh: both the name and the secret must match."""
    return hashlib.sha256(f"moemesh-mesh-v1\0{mesh_name}\0{secret}".encode()).digest()


def proof(key: bytes, role: str, nonce: bytes, first_id: bytes, second_id: bytes) -> bytes:
    return hmac.new(key, role.encode() + b"\0" + nonce + first_id + second_id, hashlib.sha256).digest()


def sign_record(key: bytes, payload: bytes) -> bytes:
    """MAC over a membership record (DHT values are writable by anyone on the DHT)."""
    return hmac.new(key, b"record\0" + payload, hashlib.sha256).digest()


class Allowlist:
    """Peer ids that proved membership, plus the nonces handed out to peers mid-handshake."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.members: set[bytes] = set()
        self._pending: dict[bytes, tuple[bytes, float]] = {}  # peer id -> (our nonce, issued at)

    def check(self, remote_id: bytes) -> None:
        if remote_id not in self.members:
            raise NotAMember("not a member of this mesh (prove the mesh secret first)")

    def allows(self, remote_id: bytes) -> bool:
        return remote_id in self.members

    def on_hello(self, local_id: bytes, remote_id: bytes, caller_nonce: bytes) -> tuple[bytes, bytes]:
        """-> (our nonce, our proof for the caller)."""
        if len(caller_nonce) != NONCE_BYTES:
            raise NotAMember("bad hello")
        now = time.monotonic()
        self._pending = {p: v for p, v in self._pending.items() if now - v[1] < PENDING_TTL}
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._pending[remote_id] = (nonce, now)
        return nonce, proof(self.key, "server", caller_nonce, local_id, remote_id)

    def on_prove(self, local_id: bytes, remote_id: bytes, mac: bytes) -> None:
        nonce, issued = self._pending.pop(remote_id, (b"", 0.0))
        if not nonce or time.monotonic() - issued > PENDING_TTL:
            raise NotAMember("no pending handshake")
        if not hmac.compare_digest(mac, proof(self.key, "client", nonce, remote_id, local_id)):
            raise NotAMember("wrong mesh secret")
        self.members.add(remote_id)
