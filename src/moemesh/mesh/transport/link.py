"""Link: one long-lived stream between two members, ordered (header, tensors) messages both ways.

A pipeline step sent as a unary call pays a call setup per token and per stage; a link is opened
once per pair of nodes and carries every step of every request after that (hivemind's binary
stream through the P2P daemon, framed with its protobuf helpers: no 4 MiB unary cap, but a peer that
announces a message over ``max_message_bytes`` or stalls mid-message is cut off). The side that
opens it is checked like any call (membership handshake first); the side that accepts it checks
the opener's peer id before reading anything.

Writes go through one writer task per link, so messages keep their order; the TEST-ONLY delay of
MeshOptions is applied per message (one hop), measured from when the message was queued. A link
whose stream ends or breaks (the peer died, or closed it) calls ``on_close`` once; the owner fails
whatever waited on it. Nothing here blocks without a bound: reads end with the stream.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from .stats import CallStats
from .wire import pack_request, pack_response, unpack

log = logging.getLogger("moemesh.mesh")
MAX_LINK_MESSAGE_BYTES = 512 << 20  # a 32k-token prefill of a 4096-wide model in fp32 is 512 MiB: split beyond that
MESSAGE_TIMEOUT = 60.0  # seconds from a message's first byte to its last (loopback or LAN moves 512 MiB in far less)
OnMessage = Callable[["Link", dict, list], Awaitable[None]]
OnClose = Callable[["Link", BaseException], None]


class Link:
    def __init__(self, peer: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, outgoing: bool,
                 stats: CallStats, delay_ms: Callable[[], float] = lambda: 0.0,
                 max_message_bytes: int = MAX_LINK_MESSAGE_BYTES, message_timeout: float = MESSAGE_TIMEOUT) -> None:
        self.peer, self.outgoing, self.stats, self.delay_ms = peer, outgoing, stats, delay_ms
        self.max_message_bytes, self.message_timeout = max_message_bytes, message_timeout
        self.peer_b58 = peer.to_base58()
        self._reader, self._writer = reader, writer
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.closed: BaseException | None = None
        self._on_close: OnClose | None = None
        # what we send is a request if we opened the link, a response if we accepted it
        self._in_type = runtime_pb2.ExpertResponse if outgoing else runtime_pb2.ExpertRequest
        self._pack = pack_request if outgoing else pack_response

    def start(self, on_message: OnMessage, on_close: OnClose) -> "Link":
        """On the mesh loop: start reading (each message handed to ``on_message`` in order) and writing."""
        self._on_close = on_close
        self._tasks = [asyncio.ensure_future(self._read(on_message)), asyncio.ensure_future(self._write())]
        return self

    def send(self, header: dict, tensors: list) -> None:
        """Queue one message (on the mesh loop; never blocks). Sending on a closed link raises."""
        if self.closed is not None:
            raise ConnectionError(f"link to {self.peer_b58} is closed: {self.closed}")
        self._queue.put_nowait((time.monotonic(), self._pack(header, tensors)))

    async def _write(self) -> None:
        try:
            while True:
                queued, msg = await self._queue.get()
                delay = self.delay_ms() / 1000
                if delay:  # TEST ONLY: one hop of latency per message (read each time: benchmarks change it)
                    await asyncio.sleep(max(0.0, queued + delay - time.monotonic()))
                data = msg.SerializeToString()
                await _send(self._writer, data)
                self.stats.sent(self.peer_b58, len(data), message=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._close(exc)

    async def _read(self, on_message: OnMessage) -> None:
        try:
            while True:
                try:
                    msg, err = await self._receive()
                except asyncio.IncompleteReadError:
                    raise ConnectionError(f"link to {self.peer_b58} ended") from None
                if err is not None:
                    raise ConnectionError(f"link to {self.peer_b58} refused: {err.message}")
                self.stats.received(self.peer_b58, msg.ByteSize(), message=True)
                header, tensors = unpack(msg)
                await on_message(self, header, tensors)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._close(exc)

    async def _receive(self) -> tuple[Message | None, RPCError | None]:
        """hivemind's framing (P2P.receive_protobuf), with limits: a peer announcing a message over
        ``max_message_bytes`` is cut off before any of it is buffered, and one whose message does not
        arrive whole within ``message_timeout`` of its first byte (a stalled or endless sender) as well.
        Waiting for the next message has no deadline: a link is idle between requests."""
        marker = await self._reader.readexactly(1)
        if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
            raise ConnectionError(f"link to {self.peer_b58}: not a message (marker {marker!r}): cut off")
        try:
            head = await asyncio.wait_for(self._reader.readexactly(P2P.HEADER_LEN), self.message_timeout)
            size = int.from_bytes(head, P2P.BYTEORDER)
            if size > self.max_message_bytes:
                raise ConnectionError(f"link to {self.peer_b58}: a message of {size} bytes is over the "
                                      f"{self.max_message_bytes}-byte limit: cut off")
            data = await asyncio.wait_for(self._reader.readexactly(size), self.message_timeout)
        except TimeoutError:
            raise ConnectionError(f"link to {self.peer_b58}: a message did not arrive whole within "
                                  f"{self.message_timeout:.0f}s: cut off") from None
        out = self._in_type() if marker == P2P.MESSAGE_MARKER else RPCError()
        try:
            out.ParseFromString(data)
        except DecodeError:
            raise ConnectionError(f"link to {self.peer_b58}: undecodable message: cut off") from None
        return (out, None) if marker == P2P.MESSAGE_MARKER else (None, out)

    def _close(self, exc: BaseException) -> None:
        if self.closed is not None:
            return
        self.closed = exc
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        try:
            self._writer.close()
        except Exception:  # already broken
            pass
        if self._on_close is not None:
            self._on_close(self, exc)

    def close(self) -> None:
        self._close(ConnectionError("closed by us"))

    async def aclose(self) -> None:
        """Close and wait until its reader and writer tasks are gone (node shutdown)."""
        self.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    """hivemind's framing: a message marker, then the length-prefixed protobuf."""
    writer.write(P2P.MESSAGE_MARKER)
    await P2P.send_raw_data(data, writer)
