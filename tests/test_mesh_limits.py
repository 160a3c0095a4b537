"""Mesh limits (issue 20 item 3, mesh part): a member that sends an oversize message on a link, or
starts a message and never finishes it, is cut off (transport/link.py) while normal messages flow."""
from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2P

from moemesh.mesh.transport.node import MeshNode, MeshOptions

NAME = "moemesh.test.limits"
LIMIT = 64 << 10


def opts(peers=(), **kw) -> MeshOptions:
    return MeshOptions(mesh_name="limits", secret="s3cret", initial_peers=list(peers), heartbeat=1.0, call_timeout=5.0, **kw)


@pytest.fixture(scope="module")
def pair():
    server = MeshNode(opts(max_message_bytes=LIMIT, message_timeout=1.0)).start()
    client = MeshNode(opts(server.run(server.visible_addrs(), 10))).start()
    events: dict[str, list] = {"messages": [], "closed": []}

    def on_open(link):
        async def on_message(link, header, tensors):
            events["messages"].append((header, tensors))

        def on_close(link, exc):
            events["closed"].append(str(exc))

        return on_message, on_close

    server.run(server.add_link_handler(NAME, on_open), 10)
    yield server, client, events
    client.stop()
    server.stop()


def raw_send(client: MeshNode, server: MeshNode, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Open a raw stream to the handler, write ``data`` and read until the server ends it: (what came back, seconds)."""

    async def go() -> tuple[bytes, float]:
        await client.ensure_member(server.peer_id, 5)
        _, reader, writer = await client.p2p.call_binary_stream_handler(server.peer_id, NAME)
        writer.write(data)
        await writer.drain()
        t0 = asyncio.get_running_loop().time()
        got = await asyncio.wait_for(reader.read(), wait)
        return got, asyncio.get_running_loop().time() - t0

    return client.run(go(), wait + 10)


def wait_for(cond, seconds: float = 10.0) -> None:
    import time

    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.05)
    assert cond()


def test_messages_under_the_limit_flow_and_over_it_cut_the_link(pair):
    server, client, events = pair
    n_closed = len(events["closed"])

    async def ignore(*args) -> None:
        return None

    async def talk(rows: int):
        link = await client.open_link(server.peer_id, NAME, ignore, lambda *a: None, 5)
        link.send({"kind": "x", "rows": rows}, [torch.zeros(rows, 64)])
        return link

    client.run(talk(16), 10)  # 4 KiB: delivered
    wait_for(lambda: any(h.get("rows") == 16 for h, _ in events["messages"]))
    client.run(talk(1024), 10)  # 256 KiB > 64 KiB: the server cuts the link off
    wait_for(lambda: len(events["closed"]) > n_closed)
    assert "over the 65536-byte limit" in events["closed"][-1]
    assert not any(h.get("rows") == 1024 for h, _ in events["messages"])


def test_announced_huge_message_is_refused_before_buffering(pair):
    server, client, events = pair
    n_closed = len(events["closed"])
    got, _ = raw_send(client, server, P2P.MESSAGE_MARKER + (2**40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    assert got == b""  # the stream was ended by the server
    wait_for(lambda: len(events["closed"]) > n_closed)
    assert "1099511627776 bytes is over" in events["closed"][-1]


def test_stalled_message_is_cut_off_after_the_deadline(pair):
    server, client, events = pair
    n_closed = len(events["closed"])
    frame = P2P.MESSAGE_MARKER + (1000).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"\0" * 10  # 10 of 1000 bytes
    got, seconds = raw_send(client, server, frame)
    assert got == b"" and seconds < 5  # message_timeout is 1 s
    wait_for(lambda: len(events["closed"]) > n_closed)
    assert "did not arrive whole" in events["closed"][-1]


def test_garbage_marker_is_cut_off(pair):
    server, client, events = pair
    n_closed = len(events["closed"])
    got, _ = raw_send(client, server, b"\x07garbage")
    assert got == b""
    wait_for(lambda: len(events["closed"]) > n_closed)
    assert "not a message" in events["closed"][-1]
