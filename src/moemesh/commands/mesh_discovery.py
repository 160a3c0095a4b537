"""``moemesh mesh invite`` and ``moemesh mesh discover``: share a mesh, find meshes on Nostr.

``add_subcommands(group)`` is called by commands/mesh.py with the ``mesh`` subparsers.
``auto_discover`` and ``list_mesh`` serve ``mesh serve --auto`` / ``--nostr-relay`` / ``--publish``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..errors import MoemeshError
from ..mesh.discovery import nostr_relays
from ..mesh.discovery.invite import Invite, new_secret
from ..mesh.discovery.join import auto_join, discover, invite_for, rank
from ..mesh.discovery.node_state import read_node_state
from ..mesh.discovery.nostr_publisher import start_mesh_listing

__all__ = ["add_subcommands", "auto_discover", "auto_join", "list_mesh"]

SECRET_ENV = "MOEMESH_MESH_SECRET"


def add_subcommands(group: argparse._SubParsersAction) -> None:
    p = group.add_parser(
        "invite", help="print an invite string for a mesh",
        description="Print a 'moemesh1:...' invite. With no options it reads the running node's state "
        "file ($MOEMESH_HOME/mesh-state.json); otherwise give --mesh-name, --secret and --addr.",
    )
    p.add_argument("--mesh-name", default=None, help="mesh name")
    p.add_argument("--secret", default=None,
                   help=f"mesh secret (default ${SECRET_ENV}); --new-secret makes one")
    p.add_argument("--new-secret", action="store_true", help="generate a fresh secret (a new mesh)")
    p.add_argument("--addr", action="append", default=[], metavar="MULTIADDR",
                   help="a node's multiaddr, e.g. /ip4/192.168.1.5/tcp/4001/p2p/Qm... (repeatable)")
    p.add_argument("--state", default=None, help="node state file to read (default under $MOEMESH_HOME)")
    p.add_argument("--decode", default=None, metavar="INVITE", help="check and show an invite instead")
    p.set_defaults(func=run_invite)

    d = group.add_parser(
        "discover", help="list meshes advertised on Nostr relays",
        description="Fetch mesh listings (kind 31990) from Nostr relays, verify their signatures and "
        "expiry, and rank them for --model. Private meshes are listed but need their secret to join.",
    )
    d.add_argument("--nostr-relay", action="append", default=[], metavar="URL",
                   help=f"relay (ws:// or wss://, repeatable; default {', '.join(nostr_relays.DEFAULT_RELAYS)})")
    d.add_argument("--model", default=None, help="rank meshes by whether they serve this model")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for listings (default 5)")
    d.add_argument("--auto", action="store_true",
                   help="print only the invite of the best joinable mesh, or say to start a new mesh")
    d.set_defaults(func=run_discover)


def run_invite(args: argparse.Namespace) -> int:
    if args.decode:
        inv = Invite.decode(args.decode)
        print(json.dumps({**inv.to_dict(), "secret": "(set)" if inv.secret else ""}, indent=2))
        return 0
    manual = args.mesh_name or args.secret or args.new_secret or args.addr
    if not manual:
        print(read_node_state(args.state).encode())
        return 0
    secret = new_secret() if args.new_secret else (args.secret or os.environ.get(SECRET_ENV, ""))
    if not args.mesh_name:
        raise MoemeshError("--mesh-name is required when building an invite by hand")
    if not secret:
        raise MoemeshError(f"no secret: pass --secret, set ${SECRET_ENV}, or --new-secret")
    if not args.addr:
        raise MoemeshError("at least one --addr MULTIADDR is required (the node others dial)")
    bad = [a for a in args.addr if not a.startswith("/")]
    if bad:
        raise MoemeshError(f"not a multiaddr (must start with '/'): {', '.join(bad)}")
    print(Invite(args.mesh_name, secret, list(args.addr)).encode())
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def run_discover(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise MoemeshError("--timeout must be positive")
    relays = args.nostr_relay or list(nostr_relays.DEFAULT_RELAYS)
    listings = discover(relays, timeout_s=args.timeout)  # RelayUnreachable -> clear CLI error
    ranked = rank(listings, args.model)
    if args.auto:
        best = ranked[0] if ranked and ranked[0].fits else None
        if args.json:
            print(json.dumps({"invite": invite_for(best).encode() if best else None}))
        elif best is None:
            print("no joinable mesh fits: start a new mesh (moemesh mesh serve ...)")
        else:
            print(invite_for(best).encode())
        return 0
    now = time.time()
    rows = []
    for s in ranked:
        c, lst = s.listing.content, s.listing
        rows.append({
            "mesh": c.mesh_name, "mesh_id": c.mesh_id, "open": c.open, "nodes": c.node_count,
            "models_served": c.models_served, "models_wanted": c.models_wanted,
            "ram_bytes": c.ram_bytes, "free_bytes": c.free_bytes, "score": round(s.score, 3),
            "fits": s.fits, "why_not": s.why, "age_s": int(now - lst.created_at),
            "expires_in_s": int(lst.expires_at - now), "author": lst.author,
            "invite": c.invite.encode() if c.open else None, "addrs": c.invite.addrs,
        })
    if args.json:
        print(json.dumps({"listings": rows}, indent=2))
        return 0
    if not rows:
        print(f"no mesh listings on {len(relays)} relay(s): start a new mesh (moemesh mesh serve ...)")
        return 0
    print(f"{'mesh':20} {'open':5} {'nodes':>5} {'free GiB':>8} {'score':>6} {'age s':>6}  models / note")
    for r in rows:
        note = ", ".join(r["models_served"]) or "-"
        if r["why_not"]:
            note += f"  [{r['why_not']}]"
        print(f"{r['mesh'][:20]:20} {'yes' if r['open'] else 'no':5} {r['nodes']:>5} {_gib(r['free_bytes']):>8} "
              f"{r['score']:>6.2f} {r['age_s']:>6}  {note}")
    return 0


def model_key(args: argparse.Namespace) -> str:
    """What --auto matches listings by: the model's identity (config + tensor index + how it runs,
    loading/identity.py), so two folders with one model meet and two models in one folder name do
    not; the bare name only when the model cannot be read here (the node then fails to load it)."""
    from ..loading.identity import identify

    try:
        return identify(args.model, getattr(args, "quant", "auto"), getattr(args, "ram", None) is not None)
    except (MoemeshError, OSError, ValueError):
        return _model_name(args.model)


def _model_name(model: str) -> str:
    """The name a listing advertises and --auto looks for: the checkpoint's last path component."""
    return Path(model.rstrip("/")).name or model


def _relays(args: argparse.Namespace) -> list[str]:
    return list(args.nostr_relay) or list(nostr_relays.DEFAULT_RELAYS)


def auto_discover(args: argparse.Namespace) -> bool:
    """--auto: join the best listed mesh (sets args.join) -> True; or prepare a new mesh -> False."""
    if args.join or args.peer:
        raise MoemeshError("--auto finds the mesh itself: leave out --join and --peer")
    known = {args.mesh_name: args.secret} if args.mesh_name and args.secret else None
    invite = auto_join(_relays(args), model=model_key(args), timeout_s=5.0, known_secrets=known)
    if invite is not None:
        print(f"moemesh: joining mesh {invite.mesh_name!r} found on Nostr ({len(invite.addrs)} address(es))",
              flush=True)
        args.join, args.mesh_name, args.secret = invite.encode(), None, None
        return True
    args.secret = args.secret or os.environ.get(SECRET_ENV) or new_secret()
    print(f"moemesh: no mesh to join on the relays: starting mesh {args.mesh_name or 'default'!r}", flush=True)
    return False


def list_mesh(args: argparse.Namespace, stack, addrs: list[str]):
    """Keep this mesh's listing on the relays (secret only with --publish) until .stop()."""
    o = stack.options.mesh

    def invite() -> Invite:
        return Invite(o.mesh_name, o.secret, addrs)

    def nodes() -> int:
        try:
            return len(stack.live_nodes())
        except MoemeshError:
            return 1

    listing = start_mesh_listing(_relays(args), invite, args.publish, [stack.model_id, _model_name(args.model)],
                                 node_count_fn=nodes, interval_s=args.listing_interval)
    print(f"moemesh: listing mesh {o.mesh_name!r} on {len(listing.relays)} Nostr relay(s)"
          f"{' with its secret (open)' if args.publish else ' (no secret)'}", flush=True)
    return listing
