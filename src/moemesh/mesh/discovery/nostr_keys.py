"""The node's Nostr identity: one secp256k1 key, created on first use and kept private (0600).

The key signs this node's mesh listings, so the same node keeps the same public key (npub)
across restarts and a relay replaces its old listing instead of piling up new ones.
Location: ``$MOEMESH_HOME/nostr.key`` (default ``~/.config/moemesh/nostr.key``), or an explicit
path. The file holds the secret key as ``nsec1...`` text.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from nostr_sdk import Keys

from moemesh.errors import MoemeshError

log = logging.getLogger(__name__)

KEY_FILE = "nostr.key"
HOME_ENV = "MOEMESH_HOME"


def moemesh_home(explicit: str | Path | None = None) -> Path:
    """Directory of per-user moemesh state: explicit > $MOEMESH_HOME > ~/.config/moemesh."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.config/moemesh").expanduser()


def default_key_path(home: str | Path | None = None) -> Path:
    return moemesh_home(home) / KEY_FILE


def _create(path: Path) -> Keys:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = Keys.generate()
    text = keys.secret_key().to_bech32() + "\n"
    # O_EXCL: two processes starting at once must not both write (one would sign with a key
    # that is then overwritten); the loser reads the winner's key below.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("created Nostr key %s (npub %s)", path, keys.public_key().to_bech32())
    return keys


def _read(path: Path) -> Keys:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("Nostr key %s had mode %o; restricting it to 0600", path, mode)
        os.chmod(path, 0o600)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        return Keys.parse(text)
    except Exception as e:  # nostr_sdk raises its own error type with a terse message
        raise MoemeshError(
            f"Nostr key file {path} is not a valid secret key ({e}); move it away to create a new one"
        ) from None


def load_or_create_keys(path: str | Path | None = None) -> Keys:
    """The node's keys from ``path`` (default: under moemesh_home()), created 0600 if missing."""
    p = Path(path).expanduser() if path is not None else default_key_path()
    try:
        try:
            return _create(p)
        except FileExistsError:
            return _read(p)
    except OSError as e:
        raise MoemeshError(f"cannot use Nostr key file {p}: {e.strerror or e}") from None
