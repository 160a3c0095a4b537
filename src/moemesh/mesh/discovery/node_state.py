"""A running node's invite on disk, so ``moemesh mesh invite`` can print it from another shell.

``mesh serve`` calls ``write_node_state(invite)`` once its addresses are known; the file is
``$MOEMESH_HOME/mesh-state.json`` (default ``~/.config/moemesh/``), mode 0600 because it holds
the mesh secret. Content: ``{"mesh": NAME, "secret": S, "addrs": [...], "pid": P,
"updated_at": UNIX}``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moemesh.errors import MoemeshError

from .invite import Invite
from .nostr_keys import moemesh_home

STATE_FILE = "mesh-state.json"


def default_state_path(home: str | Path | None = None) -> Path:
    return moemesh_home(home) / STATE_FILE


def write_node_state(invite: Invite, path: str | Path | None = None) -> Path:
    """Atomically (re)write the state file with 0600 permissions; returns its path."""
    p = Path(path).expanduser() if path is not None else default_state_path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = dict(invite.to_dict(), pid=os.getpid(), updated_at=int(time.time()))
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, p)
    return p


def read_node_state(path: str | Path | None = None) -> Invite:
    p = Path(path).expanduser() if path is not None else default_state_path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise MoemeshError(
            f"no mesh node state at {p}: start a node with `moemesh mesh serve`, "
            "or pass --mesh-name, --secret and --addr"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise MoemeshError(f"cannot read mesh node state {p}: {e}") from None
    try:
        return Invite.from_dict(data)
    except ValueError as e:
        raise MoemeshError(f"mesh node state {p} is malformed: {e}") from None
