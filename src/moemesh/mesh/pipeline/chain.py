"""The origin's side of chained stages: links to the stages it uses, the steps in flight.

``run`` sends one step down a chain of hops (``[(peer, a, b), ...]``) on the link to the first hop
and waits for the last hop's result, which comes back on the link the origin keeps open to that
hop (the origin opens a link to every hop first, so results and errors can reach it from any of
them). A step fails with ChainError, naming the peer to blame when one is known: a link that broke
(the peer died), a hop that could not reach the next one; a stage that refused the step (a
session out of sync) blames nobody. A step never waits past its timeout.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch
from hivemind.p2p import PeerID

from ..transport.link import Link
from ..transport.node import MeshError, MeshNode
from ..transport.wire import NAMES
from .stage import LINK

Hop = tuple[str, int, int]  # (peer, first layer, end layer)


class ChainError(MeshError):
    """A chained step failed; ``failed`` is the peer to blame (None: unknown or nobody)."""

    def __init__(self, message: str, failed: str | None = None, refused: bool = False) -> None:
        super().__init__(message)
        self.failed, self.refused = failed, refused


@dataclass
class _Pending:
    future: asyncio.Future
    peers: set[str]


class ChainClient:
    def __init__(self, node: MeshNode) -> None:
        self.node = node
        self.links: dict[str, Link] = {}
        self.pending: dict[int, _Pending] = {}
        self._step = 0

    async def _link(self, peer: str) -> Link:
        link = self.links.get(peer)
        if link is None or link.closed is not None:
            try:
                link = await self.node.open_link(PeerID.from_base58(peer), LINK, self._on_reply, self._on_closed,
                                                 self.node.options.call_timeout)
            except MeshError as exc:
                raise ChainError(str(exc), failed=peer) from None
            self.links[peer] = link
        return link

    async def run(self, hops: list[Hop], sessions: list[str], lens: list[int], starts: list[int], x: torch.Tensor,
                  positions: torch.Tensor, timeout: float) -> torch.Tensor:
        """x [T, D] (wire dtype), positions [T] through every hop -> y [T, D] (wire dtype)."""
        for peer in dict.fromkeys(h[0] for h in hops):
            await self._link(peer)
        self._step += 1
        step = self._step
        pending = self.pending[step] = _Pending(asyncio.get_running_loop().create_future(), {h[0] for h in hops})
        header = {"kind": "forward", "step": step, "origin": self.node.peer_id.to_base58(), "sessions": sessions,
                  "lens": lens, "starts": starts, "hops": [list(h) for h in hops], "wire": NAMES[x.dtype]}
        t0 = time.perf_counter()
        try:
            self.links[hops[0][0]].send(header, [x, positions])
            out, tensors = await asyncio.wait_for(pending.future, timeout)
        except TimeoutError:
            raise ChainError(f"layers {hops[0][1]}:{hops[-1][2]} timed out after {timeout:.1f}s "
                             f"(chain {' -> '.join(h[0][-8:] for h in hops)})") from None
        except ConnectionError as exc:
            raise ChainError(str(exc), failed=hops[0][0]) from None
        finally:
            self.pending.pop(step, None)
        last = hops[-1][0]
        self.node.stats.add(time.perf_counter() - t0, float(out.get("compute_s", 0.0)), peer=last)
        rows = int(x.shape[0])
        if out.get("rows") != rows or len(tensors) != 1 or tuple(tensors[0].shape) != (rows, x.shape[1]):
            raise ChainError(f"stage {last} answered an incomplete reply", failed=last)
        return tensors[0]

    async def _on_reply(self, link: Link, header: dict, tensors: list) -> None:
        pending = self.pending.get(header.get("step"))  # type: ignore[arg-type]
        if pending is None or pending.future.done():
            return  # late: the step already failed or timed out
        if header.get("kind") == "result":
            pending.future.set_result((header, tensors))
        elif header.get("kind") == "error":
            failed = header.get("failed")
            pending.future.set_exception(ChainError(f"{link.peer_b58}: {header.get('error')}", failed=failed,
                                                    refused=failed is None))

    def _on_closed(self, link: Link, exc: BaseException) -> None:
        if self.links.get(link.peer_b58) is link:
            del self.links[link.peer_b58]
        for pending in list(self.pending.values()):
            if link.peer_b58 in pending.peers and not pending.future.done():
                pending.future.set_exception(ChainError(f"link to {link.peer_b58} lost ({exc})", failed=link.peer_b58))

    async def close_sessions(self, peer: str, sessions: list[str]) -> None:
        """Best effort: free the sessions at ``peer`` (it also expires them itself)."""
        link = self.links.get(peer)
        if link is not None and link.closed is None:
            link.send({"kind": "close", "sessions": sessions}, [])

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
