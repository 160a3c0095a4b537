"""Mesh membership: a node without the mesh secret is refused by every handler and sees no records."""
from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import P2P

from moemesh.mesh.pipeline.chain import ChainClient
from moemesh.mesh.pipeline.stage import LINK
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.membership import Membership
from moemesh.mesh.transport.node import PING, MeshError, MeshNode, MeshOptions
from moemesh.mesh.transport.wire import WireError, decode_tensor, encode_tensor, pack_request


def opts(secret: str, peers=()) -> MeshOptions:
    return MeshOptions(mesh_name="test", secret=secret, initial_peers=list(peers), heartbeat=1.0, call_timeout=5.0)


def test_wire_round_trip_and_rejects_bad_sizes():
    for t in (torch.randn(3, 5), torch.randn(2, 4).bfloat16(), torch.arange(7), torch.empty(0, 4)):
        back = decode_tensor(encode_tensor(t))
        assert back.dtype == t.dtype and torch.equal(back, t)
    msg = encode_tensor(torch.randn(2, 3))
    msg.size[:] = [2, 4]
    with pytest.raises(WireError):
        decode_tensor(msg)


def test_node_without_secret_is_refused(tiny_checkpoints):
    path = str(tiny_checkpoints["llama-gqa"][1])
    stage = MeshStack(StackOptions(path, "1:2", "fp32", api=False, mesh=opts("right"))).start()
    nodes = []
    try:
        target = stage.node.peer_id
        intruder = MeshNode(opts("wrong", stage.addrs())).start()
        nodes.append(intruder)
        x, pos = torch.zeros(1, 48), torch.zeros(1, dtype=torch.long)
        hops = [(target.to_base58(), 1, 2)]
        with pytest.raises(MeshError, match="wrong secret|not a member"):  # handshake fails both ways
            intruder.run(ChainClient(intruder).run(hops, ["s"], [1], [0], x, pos, 10), 20)
        # skipping the handshake does not help: every handler checks the caller's peer id
        with pytest.raises(MeshError, match="not a member"):
            intruder.run(intruder._raw_call(target, PING, {}, [], 10), 20)
        header = {"kind": "forward", "step": 1, "origin": intruder.peer_id.to_base58(), "sessions": ["s"],
                  "lens": [1], "starts": [0], "hops": [list(h) for h in hops], "wire": "fp32"}

        async def sneak() -> bytes:  # a raw link: the stage closes it without reading a byte
            _, reader, writer = await intruder.p2p.call_binary_stream_handler(target, LINK)
            try:
                writer.write(P2P.MESSAGE_MARKER)
                await P2P.send_raw_data(pack_request(header, [x, pos]).SerializeToString(), writer)
                return await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:  # closed before our bytes were all sent: a reset, also no answer
                return b""

        assert intruder.run(sneak(), 20) == b""
        assert intruder.run(Membership(intruder, None).live_nodes(), 20) == []  # records are MAC'd
        assert stage.stage.rows == 0
        member = MeshNode(opts("right", stage.addrs())).start()
        nodes.append(member)
        y = member.run(ChainClient(member).run(hops, ["s"], [1], [0], x, pos, 10), 20)
        assert y.shape == (1, 48) and stage.stage.rows == 1
        assert [r.layers for r in member.run(Membership(member, None).live_nodes(), 20)] == [(1, 2)]
    finally:
        for n in nodes:
            n.stop()
        stage.stop()
