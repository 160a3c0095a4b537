"""Mesh membership: a node without the mesh secret is refused by every handler and sees no records."""
from __future__ import annotations

import pytest
import torch

from moemesh.mesh.pipeline import remote
from moemesh.mesh.pipeline.stage import FORWARD
from moemesh.mesh.stack import MeshStack, StackOptions
from moemesh.mesh.transport.membership import Membership
from moemesh.mesh.transport.node import MeshError, MeshNode, MeshOptions
from moemesh.mesh.transport.wire import WireError, decode_tensor, encode_tensor


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
        call = remote.StageCall(["s"], [1], [0], torch.zeros(1, 48), torch.zeros(1, dtype=torch.long))
        with pytest.raises(MeshError, match="wrong secret|not a member"):  # handshake fails both ways
            intruder.run(remote.forward(intruder, target, call), 20)
        # skipping the handshake does not help: the handler checks the caller's peer id
        with pytest.raises(MeshError, match="not a member"):
            intruder.run(intruder._raw_call(target, FORWARD, {"sessions": ["s"], "lens": [1], "starts": [0]},
                                            [call.x, call.positions], 10), 20)
        assert intruder.run(Membership(intruder, None).live_nodes(), 20) == []  # records are MAC'd
        assert stage.stage.rows == 0
        member = MeshNode(opts("right", stage.addrs())).start()
        nodes.append(member)
        y = member.run(remote.forward(member, target, call), 20)
        assert y.shape == (1, 48) and stage.stage.rows == 1
        assert [r.layers for r in member.run(Membership(member, None).live_nodes(), 20)] == [(1, 2)]
    finally:
        for n in nodes:
            n.stop()
        stage.stop()
