"""Mesh invites: a compact, copy-pasteable string carrying what a node needs to join a mesh.

Format: ``moemesh1:<base64url(canonical JSON)>.<checksum>`` where the checksum is the first 6
base64url characters of SHA-256 over the payload part, so a mistyped or truncated invite is
caught before we try to dial anything. The JSON is canonical (sorted keys, no spaces) so the
same invite always encodes to the same string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass, field

from moemesh.errors import MoemeshError

PREFIX = "moemesh1:"
CHECKSUM_CHARS = 6
SECRET_BYTES = 24  # 192 bits, 32 urlsafe characters
MAX_INVITE_CHARS = 8192  # an invite is a few hundred characters; refuse anything huge before decoding


class InviteError(MoemeshError, ValueError):
    """The invite text is malformed; the message says what is wrong."""


def new_secret() -> str:
    """A fresh random mesh secret (urlsafe text)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _checksum(payload: str) -> str:
    return _b64encode(hashlib.sha256(payload.encode("ascii")).digest())[:CHECKSUM_CHARS]


@dataclass(frozen=True)
class Invite:
    """mesh_name: human name of the mesh; secret: shared mesh secret ("" for a listing that
    must not carry it); addrs: multiaddrs of one or more nodes to dial."""

    mesh_name: str
    secret: str
    addrs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.mesh_name, str) or not self.mesh_name.strip():
            raise InviteError("invite: mesh name must be a non-empty string")
        if not isinstance(self.secret, str):
            raise InviteError("invite: secret must be a string")
        if not isinstance(self.addrs, list) or not all(isinstance(a, str) and a for a in self.addrs):
            raise InviteError("invite: addrs must be a list of non-empty multiaddr strings")

    def to_dict(self) -> dict:
        return {"mesh": self.mesh_name, "secret": self.secret, "addrs": list(self.addrs)}

    def without_secret(self) -> "Invite":
        return Invite(self.mesh_name, "", list(self.addrs))

    def encode(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        payload = _b64encode(canonical.encode("utf-8"))
        return f"{PREFIX}{payload}.{_checksum(payload)}"

    @classmethod
    def from_dict(cls, d: object) -> "Invite":
        if not isinstance(d, dict):
            raise InviteError("invite: payload is not a JSON object")
        missing = [k for k in ("mesh", "secret", "addrs") if k not in d]
        if missing:
            raise InviteError(f"invite: payload lacks field(s) {', '.join(missing)}")
        return cls(mesh_name=d["mesh"], secret=d["secret"], addrs=d["addrs"])

    @classmethod
    def decode(cls, text: str) -> "Invite":
        if not isinstance(text, str):
            raise InviteError("invite: expected text")
        if len(text) > MAX_INVITE_CHARS:
            raise InviteError(f"invite: {len(text)} characters, more than {MAX_INVITE_CHARS} (not a moemesh invite?)")
        text = "".join(text.split())  # tolerate line breaks/spaces from copy-paste
        if not text.startswith(PREFIX):
            raise InviteError(f"invite: does not start with {PREFIX!r} (not a moemesh invite?)")
        body = text[len(PREFIX):]
        payload, dot, check = body.rpartition(".")
        if not dot or not payload:
            raise InviteError("invite: missing checksum (truncated when copied?)")
        if not payload.isascii():  # base64url is ASCII: anything else is a typo or not an invite
            raise InviteError("invite: payload has non-ASCII characters (not a moemesh invite?)")
        if check != _checksum(payload):
            raise InviteError("invite: checksum mismatch (typo or truncated copy)")
        try:
            d = json.loads(_b64decode(payload).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # deep nesting too
            raise InviteError(f"invite: payload is not valid base64 JSON ({e})") from None
        return cls.from_dict(d)
