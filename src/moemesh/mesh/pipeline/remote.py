"""Client side of a stage call: split a batch under the message cap, call, check the reply."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from hivemind.p2p import PeerID

from ..transport.node import MeshError, MeshNode
from ..transport.wire import NAMES, SAFE_PAYLOAD_BYTES
from .stage import CLOSE, FORWARD


@dataclass
class StageCall:
    """Rows of several sessions on one peer: x [T, D] in the wire dtype, positions [T]."""

    sessions: list[str]
    lens: list[int]
    starts: list[int]
    x: torch.Tensor
    positions: torch.Tensor


def split_call(call: StageCall, max_rows: int) -> list[StageCall]:
    """Consecutive pieces of at most ``max_rows`` rows; a session cut in two continues at the
    right start in the next piece (pieces must be sent in order)."""
    if call.x.shape[0] <= max_rows:
        return [call]
    pieces, cur = [], StageCall([], [], [], call.x[:0], call.positions[:0])
    row = 0
    for sid, n, start in zip(call.sessions, call.lens, call.starts):
        done = 0
        while done < n:
            room = max_rows - sum(cur.lens)
            if room == 0:
                pieces.append(cur)
                cur = StageCall([], [], [], call.x[:0], call.positions[:0])
                room = max_rows
            take = min(room, n - done)
            cur.sessions.append(sid)
            cur.lens.append(take)
            cur.starts.append(start + done)
            done += take
        row += n
    pieces.append(cur)
    # fill tensors by walking the rows once more in the same order
    offset = 0
    for piece in pieces:
        rows = sum(piece.lens)
        piece.x = call.x[offset : offset + rows]
        piece.positions = call.positions[offset : offset + rows]
        offset += rows
    return pieces


async def forward(node: MeshNode, peer: PeerID, call: StageCall) -> torch.Tensor:
    """Run the peer's layers over ``call`` -> y [T, D] (wire dtype); MeshError on any failure."""
    row_bytes = call.x.shape[1] * call.x.element_size()
    outs = []
    for piece in split_call(call, max(1, SAFE_PAYLOAD_BYTES // row_bytes)):
        rows = sum(piece.lens)
        timeout = node.options.call_timeout + node.options.per_row_timeout * rows
        header = {"sessions": piece.sessions, "lens": piece.lens, "starts": piece.starts, "wire": NAMES[call.x.dtype]}
        t0 = time.perf_counter()
        out, tensors = await node.call(peer, FORWARD, header, [piece.x, piece.positions], timeout)
        node.stats.add(time.perf_counter() - t0, float(out.get("compute_s", 0.0)))
        if out.get("rows") != rows or len(tensors) != 1 or tuple(tensors[0].shape) != (rows, call.x.shape[1]):
            raise MeshError(f"stage {peer} answered an incomplete reply")
        outs.append(tensors[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


async def close(node: MeshNode, peer: PeerID, sessions: list[str]) -> None:
    try:
        await node.call(peer, CLOSE, {"sessions": sessions}, [], node.options.call_timeout)
    except MeshError:
        pass  # the peer is gone or will expire the sessions itself
