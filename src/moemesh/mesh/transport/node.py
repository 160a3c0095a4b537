"""MeshNode: one P2P daemon + DHT node + membership proof, on a private asyncio loop thread.

The engine and the HTTP server are synchronous or live on other loops, so everything hivemind
runs here and other threads enter through ``run(coro, timeout)``. We use ``DHTNode`` on this
loop rather than ``hivemind.DHT`` (a forked process): forking a process that already holds
torch threads and a model is unsafe, and one loop keeps one daemon per node.

Every outgoing call goes through ``call``: membership proven first, an ``asyncio.wait_for`` on
every await (hivemind has no timeouts), an optional test-only delay per call (benchmarks of
per-hop latency), and replies checked for completeness (a dying peer can answer empty). Long-lived
streams (``open_link`` / ``add_link_handler``, transport/link.py) carry pipeline steps; ``ping``
measures a link's latency and tells a hung peer from a slow one.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from ...errors import MoemeshError
from . import auth
from .link import MAX_LINK_MESSAGE_BYTES, MESSAGE_TIMEOUT, Link, OnClose, OnMessage
from .stats import CallStats, PeerStats  # noqa: F401  (PeerStats: re-exported)
from .wire import pack_request, pack_response, unpack

log = logging.getLogger("moemesh.mesh")
T = TypeVar("T")
Handler = Callable[[dict, list, P2PContext], Awaitable[tuple[dict, list]]]
PING = "moemesh.node.ping"


class MeshError(MoemeshError):
    """A mesh call failed: peer unreachable, refused, timed out, or answered garbage."""


@dataclass
class MeshOptions:
    mesh_name: str = "default"
    secret: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    initial_peers: list[str] = field(default_factory=list)
    heartbeat: float = 5.0  # seconds between membership announcements (records live 3x longer)
    call_timeout: float = 10.0  # seconds for one call, plus per_row_timeout per activation row
    per_row_timeout: float = 0.02
    max_message_bytes: int = MAX_LINK_MESSAGE_BYTES  # a link message announced bigger cuts the link
    message_timeout: float = MESSAGE_TIMEOUT  # a link message must arrive whole this long after its first byte
    test_delay_ms: float = 0.0  # TEST ONLY: sleep this long before every outgoing call (fake latency)


class MeshNode:
    def __init__(self, options: MeshOptions) -> None:
        if not options.secret:
            raise MeshError("a mesh needs a secret (--secret, $MOEMESH_MESH_SECRET, or --join INVITE)")
        self.options = options
        self.allowlist = auth.Allowlist(auth.mesh_key(options.mesh_name, options.secret))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="moemesh-mesh", daemon=True)
        self.p2p: P2P | None = None
        self.dht: DHTNode | None = None
        self.peer_id: PeerID | None = None
        self._proven: dict[bytes, asyncio.Future] = {}  # peers we proved ourselves to (and they to us)
        self._tasks: set[asyncio.Task] = set()  # background tasks, cancelled on stop
        self._links: set[Link] = set()  # open links, closed on stop
        self.stats = CallStats()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "MeshNode":
        self._thread.start()
        self.run(self._start(), timeout)
        return self

    async def _start(self) -> None:
        o = self.options
        # nat_port_map/auto_nat/use_relay off: nothing reaches beyond the given host address
        self.p2p = await P2P.create(
            initial_peers=o.initial_peers or None, host_maddrs=[f"/ip4/{o.host}/tcp/{o.port}"],
            nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False, startup_timeout=30,
        )
        self.peer_id = self.p2p.peer_id
        self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=o.initial_peers or None, wait_timeout=3,
                                        ensure_bootstrap_success=bool(o.initial_peers))
        await self.add_handler(auth.HELLO, self._on_hello, members_only=False)
        await self.add_handler(auth.PROVE, self._on_prove, members_only=False)
        await self.add_handler(PING, self._on_ping)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self._stop(), 10.0)
        except Exception as exc:  # best effort: the daemon dies with its parent anyway
            log.warning("mesh shutdown: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def _stop(self) -> None:
        await asyncio.gather(*(link.aclose() for link in list(self._links)), return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:  # heartbeats, session GC, pending closes
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.dht is not None:
            await asyncio.wait_for(self.dht.shutdown(), 5)
        if self.p2p is not None:
            await asyncio.wait_for(self.p2p.shutdown(), 5)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the mesh loop from another thread; never waits past ``timeout``."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 1.0)
        except TimeoutError:
            future.cancel()
            raise MeshError(f"mesh operation timed out after {timeout:.1f}s") from None

    def spawn(self, coro: Coroutine) -> None:
        """Fire and forget on the mesh loop from any thread (session closes and the like)."""
        self.loop.call_soon_threadsafe(self.background, coro)

    def background(self, coro: Coroutine) -> asyncio.Task:
        """On the mesh loop: a task cancelled when the node stops."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def visible_addrs(self) -> list[str]:
        assert self.p2p is not None
        return [str(a) for a in await self.p2p.get_visible_maddrs()]

    # --- handlers --------------------------------------------------------------------------
    async def add_handler(self, name: str, handler: Handler, members_only: bool = True) -> None:
        """Register a unary handler taking and returning (header, tensors). Members only unless
        told otherwise: the caller's peer id is checked before the handler sees anything."""

        async def unary(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
            if members_only:
                self.allowlist.check(context.remote_id.to_bytes())
            header, tensors = unpack(request)
            out_header, out_tensors = await handler(header, tensors, context)
            return pack_response(out_header, out_tensors)

        assert self.p2p is not None
        await self.p2p.add_protobuf_handler(name, unary, runtime_pb2.ExpertRequest)

    async def _on_hello(self, header: dict, tensors: list, ctx: P2PContext) -> tuple[dict, list]:
        nonce, mac = self.allowlist.on_hello(ctx.local_id.to_bytes(), ctx.remote_id.to_bytes(), header.get("nonce", b""))
        return {"nonce": nonce, "proof": mac}, []

    async def _on_ping(self, header: dict, tensors: list, ctx: P2PContext) -> tuple[dict, list]:
        return {"ok": True}, []

    async def add_link_handler(self, name: str, on_open: Callable[[Link], tuple[OnMessage, OnClose]]) -> None:
        """Accept links named ``name`` from members: ``on_open(link)`` -> (on_message, on_close)."""

        async def accept(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not self.allowlist.allows(info.peer_id.to_bytes()):
                writer.close()  # not a member: the opener reads an ended stream
                return
            link = Link(info.peer_id, reader, writer, outgoing=False, stats=self.stats,
                        delay_ms=lambda: self.options.test_delay_ms, **self._limits())
            on_message, on_close = on_open(link)
            self._links.add(link)
            link.start(on_message, self._untrack(on_close))

        assert self.p2p is not None
        await self.p2p.add_binary_stream_handler(name, accept)

    async def open_link(self, peer: PeerID, name: str, on_message: OnMessage, on_close: OnClose,
                        timeout: float) -> Link:
        """A link to ``peer``'s handler ``name`` (handshake first); MeshError if it cannot be opened."""
        assert self.p2p is not None
        await self.ensure_member(peer, timeout)
        try:
            _, reader, writer = await asyncio.wait_for(self.p2p.call_binary_stream_handler(peer, name), timeout)
        except TimeoutError:
            raise MeshError(f"opening {name} to {peer} timed out after {timeout:.1f}s") from None
        except Exception as exc:
            raise MeshError(f"opening {name} to {peer} failed: {' '.join(str(exc).split())}") from None
        link = Link(peer, reader, writer, outgoing=True, stats=self.stats, delay_ms=lambda: self.options.test_delay_ms,
                    **self._limits())
        self._links.add(link)
        return link.start(on_message, self._untrack(on_close))

    def _limits(self) -> dict:
        return {"max_message_bytes": self.options.max_message_bytes, "message_timeout": self.options.message_timeout}

    def _untrack(self, on_close: OnClose) -> OnClose:
        def closed(link: Link, exc: BaseException) -> None:
            self._links.discard(link)
            on_close(link, exc)

        return closed

    async def ping(self, peer: PeerID, timeout: float) -> float:
        """Round trip of an empty members-only call, in seconds (recorded per peer); MeshError on failure."""
        t0 = time.perf_counter()
        await self.call(peer, PING, {}, [], timeout)
        rtt = time.perf_counter() - t0
        self.stats.peer(peer.to_base58()).rtt_s = rtt
        return rtt

    async def _on_prove(self, header: dict, tensors: list, ctx: P2PContext) -> tuple[dict, list]:
        self.allowlist.on_prove(ctx.local_id.to_bytes(), ctx.remote_id.to_bytes(), header.get("proof", b""))
        return {"ok": True}, []

    # --- calls -----------------------------------------------------------------------------
    async def ensure_member(self, peer: PeerID, timeout: float) -> None:
        """Prove ourselves to ``peer`` (and check its proof) once; later calls reuse it."""
        key = peer.to_bytes()
        fut = self._proven.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._proven[key] = asyncio.ensure_future(self._handshake(peer, timeout))
        await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def _handshake(self, peer: PeerID, timeout: float) -> None:
        assert self.p2p is not None and self.peer_id is not None
        me, them = self.peer_id.to_bytes(), peer.to_bytes()
        nonce = secrets.token_bytes(auth.NONCE_BYTES)
        header, _ = await self._raw_call(peer, auth.HELLO, {"nonce": nonce}, [], timeout)
        expected = auth.proof(self.allowlist.key, "server", nonce, them, me)
        if not isinstance(header.get("proof"), bytes) or not auth.hmac.compare_digest(header["proof"], expected):
            raise MeshError(f"peer {peer} is not a member of this mesh (wrong secret)")
        mac = auth.proof(self.allowlist.key, "client", header["nonce"], me, them)
        await self._raw_call(peer, auth.PROVE, {"proof": mac}, [], timeout)
        self.allowlist.members.add(them)  # it proved the secret: it may call us as well

    async def _raw_call(self, peer: PeerID, name: str, header: dict, tensors: list, timeout: float):
        assert self.p2p is not None
        request = pack_request(header, tensors)
        self.stats.sent(peer.to_base58(), request.ByteSize())
        try:
            reply = await asyncio.wait_for(
                self.p2p.call_protobuf_handler(peer, name, request, runtime_pb2.ExpertResponse), timeout)
        except TimeoutError:
            raise MeshError(f"{name} to {peer} timed out after {timeout:.1f}s") from None
        except MeshError:
            raise
        except Exception as exc:
            raise MeshError(f"{name} to {peer} failed: {' '.join(str(exc).split())}") from None
        self.stats.received(peer.to_base58(), reply.ByteSize())
        return unpack(reply)

    async def call(self, peer: PeerID, name: str, header: dict, tensors: list, timeout: float) -> tuple[dict, list]:
        """A members-only call: handshake if needed, test delay, timeout, complete reply."""
        if self.options.test_delay_ms:
            await asyncio.sleep(self.options.test_delay_ms / 1000)
        await self.ensure_member(peer, timeout)
        out, tensors = await self._raw_call(peer, name, header, tensors, timeout)
        if "error" in out:
            raise MeshError(f"{name} at {peer}: {out['error']}")
        return out, tensors
