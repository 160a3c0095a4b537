"""``moemesh mesh serve`` and ``moemesh mesh status``; discovery subcommands (invite, discover)
come from commands/mesh_discovery.py through ``add_subcommands`` when that module is present.

``mesh serve`` modes: pipeline (``--layers A:B``) or expert shards (``--experts``, optionally
``--masked``); ``--auto``/``--nostr-relay``/``--publish`` find or list the mesh on Nostr."""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading

from ..errors import MoemeshError
from ..models.build import QUANT_MODES
from .limit_args import add_limit_args, connection_limits

SECRET_ENV = "MOEMESH_MESH_SECRET"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mesh", help="run a model across several machines (pipeline stages or expert shards)")
    group = p.add_subparsers(dest="mesh_command", required=True)
    _add_serve(group)
    _add_status(group)
    if importlib.util.find_spec("moemesh.commands.mesh_discovery") is not None:
        from . import mesh_discovery

        mesh_discovery.add_subcommands(group)


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--join", default=None, metavar="INVITE", help="join with an invite (mesh name, secret, peers)")
    p.add_argument("--peer", action="append", default=[], metavar="MULTIADDR",
                   help="a node to dial, e.g. /ip4/192.168.1.5/tcp/4001/p2p/Qm... (repeatable)")
    p.add_argument("--mesh-name", default=None, help="mesh name (default: from --join, else 'default')")
    p.add_argument("--secret", default=None, help=f"mesh secret (default: from --join, else ${SECRET_ENV})")
    p.add_argument("--host", default="127.0.0.1", help="address the P2P daemon listens on (default 127.0.0.1)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between announcements (default 5)")
    p.add_argument("--call-timeout", type=float, default=10.0,
                   help="seconds before a stage call counts as failed and fails over (default 10)")


def _add_serve(group: argparse._SubParsersAction) -> None:
    p = group.add_parser(
        "serve", help="serve layers A:B of a model as a mesh node (and the OpenAI API unless --no-api)",
        description="Load layers A:B, serve them to mesh members, announce them; unless --no-api, also serve "
        "the OpenAI/Anthropic API, running the other layers on peers (pipeline).")
    p.add_argument("model", help="checkpoint directory, .gguf file, or 'smollm2'")
    p.add_argument("--layers", default=None, metavar="A:B|auto",
                   help="layer range this node offers (default: all); auto: no fixed range, the API node's plan "
                   "splits the layers among such nodes by their --ram budgets and moves a dead node's layers to "
                   "the survivors")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="whole-process budget, e.g. 8G: experts streamed from this node's own expert store (an HF MoE "
                   "directory is converted once) into a cache of the rest; the node holds every layer's trunk, so a "
                   "plan can give it any layers or experts (elastic)")
    p.add_argument("--port", type=int, default=0, help="P2P port (default 0: any free one)")
    p.add_argument("--no-api", action="store_true", help="stage only: no HTTP API, no embedding/head loaded")
    p.add_argument("--http-host", default="127.0.0.1", help="HTTP API address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP API port (default 8080; 0 picks one)")
    p.add_argument("--api-key", default=os.environ.get("MOEMESH_API_KEY"), help="require this API key")
    p.add_argument("--quant", choices=QUANT_MODES, default="auto", help="weights at run time")
    p.add_argument("--kv", default="dense", help="KV cache (dense | turboquant:BITS[:WINDOW])")
    p.add_argument("--wire", choices=("fp32", "bf16"), default="fp32",
                   help="activations between stages: fp32 (exact, default) or bf16 (half the bytes)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    add_limit_args(p)
    p.add_argument("--test-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # TEST ONLY: fake latency
    p.add_argument("--expert-slots", type=int, default=None, help=argparse.SUPPRESS)  # TEST ONLY: cache slots, no budget
    p.add_argument("--experts", default=None, metavar="auto|A:B|LIST",
                   help="expert-shard mode: hold every layer's trunk but only these experts (e.g. 0:64 or 0,5,9:12; "
                   "auto: the experts the live nodes hold least, as many as fit in memory); rows routed to other "
                   "experts go to their holders, one call per peer per layer (exact with --wire fp32)")
    p.add_argument("--expert-ram", default=None, metavar="SIZE",
                   help="memory --experts auto may fill with experts, e.g. 8G (default: 80%% of free memory)")
    p.add_argument("--masked", action="store_true",
                   help="with --experts: route every token only to this node's experts, so no activation crosses "
                   "the network; APPROXIMATE: on random-weight test models the next-token argmax matched the exact "
                   "model's 1-59%% of the time (KL 0.016-2.2 nats), see bench/results/masked_quality.md")
    p.add_argument("--nostr-relay", action="append", default=[], metavar="URL",
                   help="Nostr relay (ws:// or wss://, repeatable) for --auto and for this mesh's listing; a node "
                   "that starts a mesh lists it there (addresses only, unless --publish)")
    p.add_argument("--publish", action="store_true",
                   help="put the mesh secret in the Nostr listing: anyone who reads the relay can join")
    p.add_argument("--auto", action="store_true",
                   help="join the best mesh listed on the relays for this model, or start a new one (and list it)")
    p.add_argument("--listing-interval", type=float, default=60.0, help=argparse.SUPPRESS)  # seconds between listings
    _add_mesh_args(p)
    p.set_defaults(func=run_serve)


def _add_status(group: argparse._SubParsersAction) -> None:
    p = group.add_parser("status", help="list the live nodes of a mesh")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_mesh_args(p)
    p.set_defaults(func=run_status)


def mesh_options(args: argparse.Namespace, port: int = 0, test_delay_ms: float = 0.0):
    from ..mesh.transport.node import MeshOptions

    name, secret, peers = args.mesh_name, args.secret, list(args.peer)
    if args.join:
        from ..mesh.discovery.invite import Invite

        try:
            invite = Invite.decode(args.join)
        except ValueError as exc:
            raise MoemeshError(f"--join: {exc}") from None
        name, secret, peers = name or invite.mesh_name, secret or invite.secret, peers + list(invite.addrs)
    secret = secret or os.environ.get(SECRET_ENV, "")
    if not secret:
        raise MoemeshError(f"a mesh needs a secret: --secret, ${SECRET_ENV}, or --join INVITE")
    bad = [a for a in peers if not a.startswith("/")]
    if bad:
        raise MoemeshError(f"--peer must be a multiaddr starting with '/': {', '.join(bad)}")
    if args.heartbeat <= 0 or args.call_timeout <= 0:
        raise MoemeshError("--heartbeat and --call-timeout must be > 0")
    return MeshOptions(mesh_name=name or "default", secret=secret, host=args.host, port=port, initial_peers=peers,
                       heartbeat=args.heartbeat, call_timeout=args.call_timeout, test_delay_ms=test_delay_ms)


def run_serve(args: argparse.Namespace) -> int:
    from ..mesh.stack import StackOptions

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.masked and args.experts is None:
        raise MoemeshError("--masked is an option of expert-shard mode: give --experts too")
    from ..experts.budget import parse_size

    expert_ram = parse_size(args.expert_ram) if args.expert_ram is not None else None
    ram = parse_size(args.ram) if args.ram is not None else None
    joined = False
    if args.auto:
        from .mesh_discovery import auto_discover

        joined = auto_discover(args)
    options = StackOptions(args.model, args.layers, args.quant, args.kv, api=not args.no_api, wire=args.wire,
                           experts=args.experts, expert_ram=expert_ram, masked=args.masked, ram=ram,
                           expert_slots=args.expert_slots,
                           mesh=mesh_options(args, args.port, args.test_delay_ms))
    list_mesh = bool(args.nostr_relay or args.publish) and not joined
    if args.no_api:
        stack = _start(options)
        listing = _list_mesh(args, stack) if list_mesh else None
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        if listing is not None:
            listing.stop()
        stack.stop()
        return 0
    return _serve_api(args, options, list_mesh)


def _list_mesh(args: argparse.Namespace, stack):
    from .mesh_discovery import list_mesh

    return list_mesh(args, stack, _addrs(stack))


def _addrs(stack) -> list[str]:
    pid = stack.node.peer_id.to_base58()
    return [a if "/p2p/" in a else f"{a}/p2p/{pid}" for a in stack.addrs()]


def _start(options):
    from ..mesh.pipeline.slice import parse_layers  # noqa: F401  (checks --layers before the daemon starts)
    from ..mesh.stack import MeshStack

    stack = MeshStack(options)
    try:
        stack.start()
    except ValueError as exc:  # bad --layers
        stack.stop()
        raise MoemeshError(str(exc)) from None
    _announce(stack)
    return stack


def _announce(stack) -> None:
    from ..mesh.shards.assign import describe

    addrs = _addrs(stack)
    sl, a, rec = stack.slice, stack.slice.args, stack.membership.record
    share = "auto (a plan decides)" if rec.share is None else f"{rec.share[0]}:{rec.share[1]}"
    experts = ""
    if stack.options.experts is not None:
        held = "auto (a plan decides)" if rec.experts is None else describe(rec.experts, a.num_experts)
        experts = f", experts {held} of {a.num_experts}" + (" (masked)" if stack.options.masked else "")
    budget = ""
    if sl.budget is not None:
        b = sl.budget
        budget = (f"; --ram {b.ram / 2**20:.0f} MiB: trunk {b.trunk / 2**20:.0f} MiB, expert cache "
                  f"{b.expert_cache / 2**20:.0f} MiB ({b.slots} experts)")
    kind = "elastic" if sl.elastic else "fixed"
    print(f"moemesh: mesh node {stack.node.peer_id.to_base58()} ({kind}) serving layers {share} of "
          f"{a.num_layers}{experts}{budget}; model {stack.model_id}", flush=True)
    for a in addrs:
        print(f"moemesh: mesh address {a}", flush=True)
    try:
        from ..mesh.discovery.invite import Invite
        from ..mesh.discovery.node_state import write_node_state

        o = stack.options.mesh
        write_node_state(Invite(o.mesh_name, o.secret, addrs))
    except Exception as exc:  # the state file only helps `mesh invite`; never fatal
        print(f"moemesh: note: could not write the node state file: {exc}", file=sys.stderr)


def _serve_api(args: argparse.Namespace, options, list_mesh: bool = False) -> int:
    from .serve import _listen

    limits = connection_limits(args)  # checked before the mesh starts
    sock = _listen(args.http_host, args.http_port)
    port = sock.getsockname()[1]
    options.http = f"http://{args.http_host}:{port}"
    stack = _start(options)
    listing = _list_mesh(args, stack) if list_mesh else None

    import logging

    from ..mesh.api import MeshServerState
    from ..server.app import build_app
    from ..server.common.protocol import http_server
    from ..server.core.state import ServerConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(model=args.model, host=args.http_host, port=port, api_key=args.api_key, kv=options.kv,
                          max_batch=args.max_batch, quant=options.quant, threads=args.threads, limits=limits)
    state = MeshServerState(config, stack)

    def on_loaded(st) -> None:
        if st.status == "ready":
            print(f"moemesh: ready: {st.model_name} (mesh pipeline), context {st.context_length}", flush=True)
        else:
            print(f"moemesh: error: {st.load_error}", file=sys.stderr, flush=True)

    app = build_app(state, on_loaded)
    print(f"moemesh: listening on http://{args.http_host}:{port}", flush=True)
    server = http_server(app, limits)
    try:
        server.run(sockets=[sock])
    finally:
        if listing is not None:
            listing.stop()
        stack.stop()
    return 2 if state.status == "failed" else 0


def run_status(args: argparse.Namespace) -> int:
    from .mesh_status import show_status

    options = mesh_options(args)
    if not options.initial_peers:
        raise MoemeshError("mesh status needs a node to ask: --peer MULTIADDR or --join INVITE")
    return show_status(options, args.json)
