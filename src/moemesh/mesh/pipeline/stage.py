"""StageServer: runs layer ranges for mesh members, one KV session per (origin, request), chained.

Steps arrive on links (transport/link.py), one long-lived stream per pair of nodes. A ``forward``
message carries the rows of several sessions laid end to end (like the engine's BatchLayout) and
the hops still ahead: ``[[peer, a, b], ...]``, this node first. The node runs layers [a, b), then
sends the result on to the next hop, or, at the last hop, straight back to the origin on the link
the origin opened to it: N hops per token for N stages instead of a round trip per stage.

``forward``: {step, origin, sessions, lens, starts, hops, wire, compute_s (of the hops before)},
[x [T, D] (wire dtype), positions [T]]
``close``: {sessions} from the origin frees them (sessions idle past ``session_ttl`` are freed too)
replies to the origin: ``result`` {step, rows, compute_s (every hop's)}, [y [T, D]] or ``error``
{step, failed, error}
(``failed``: the peer we could not reach, or null when this node itself refused the step).

A session is created by its first step (start must be 0) and bound to its layer range; later steps
must continue it exactly (start == tokens already cached), so an origin that lost track gets an
error and replays instead of silently corrupting the cache. All torch work runs on one worker
thread: the caches are not thread-safe and the mesh loop must stay free for other links.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from hivemind.p2p import PeerID

from ...batch import BatchLayout
from ...kvcache.base import KVCache
from ..transport.link import Link
from ..transport.node import MeshNode
from ..transport.wire import DTYPES
from .slice import StageLayers

LINK = "moemesh.stage.link"
SERVED_WINDOW_S = 60.0  # a range counts as this node's share while it ran within this window
log = logging.getLogger("moemesh.mesh")


@dataclass
class _Session:
    seq_id: int
    start: int
    end: int
    last_used: float


class StageServer:
    def __init__(self, node: MeshNode, stage: StageLayers, kv: str = "dense", session_ttl: float = 600.0) -> None:
        self.node, self.stage, self.kv = node, stage, kv
        self.session_ttl = session_ttl
        self.caches: dict[tuple[int, int], KVCache] = {}  # one per layer range served
        self.sessions: dict[tuple[str, str], _Session] = {}  # (origin, session id)
        self.incoming: dict[str, Link] = {}  # peer -> the link it opened to us (an origin's results go back on it)
        self.outgoing: dict[str, Link] = {}  # next hop -> our link to it
        self.served: dict[tuple[int, int], float] = {}  # layer range -> when it last ran here
        self._next_id = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="moemesh-stage")
        self.calls = 0
        self.rows = 0
        self.compute_s = 0.0

    @property
    def load(self) -> int:
        return len(self.sessions)

    def share(self, window: float = SERVED_WINDOW_S) -> list[tuple[int, int]]:
        """The layer ranges run here recently (what plans currently give this node)."""
        now = time.monotonic()
        return sorted(r for r, t in list(self.served.items()) if now - t < window)

    def start(self) -> None:
        async def register() -> None:
            await self.node.add_link_handler(LINK, self._accept)
            self.node.background(self._gc())

        self.node.run(register(), 30.0)

    # --- links -------------------------------------------------------------------------------
    def _accept(self, link: Link):
        old = self.incoming.get(link.peer_b58)
        self.incoming[link.peer_b58] = link
        if old is not None and old is not link:
            old.close()
        return self._on_message, self._on_incoming_closed

    def _on_incoming_closed(self, link: Link, exc: BaseException) -> None:
        if self.incoming.get(link.peer_b58) is link:
            del self.incoming[link.peer_b58]

    async def _link_to(self, peer: str) -> Link:
        link = self.outgoing.get(peer)
        if link is None or link.closed is not None:
            async def ignore(_link: Link, header: dict, tensors: list) -> None:
                pass  # we are not the origin of anything sent on this link

            def closed(lk: Link, exc: BaseException) -> None:
                if self.outgoing.get(peer) is lk:
                    del self.outgoing[peer]

            link = self.outgoing[peer] = await self.node.open_link(
                PeerID.from_base58(peer), LINK, ignore, closed, self.node.options.call_timeout)
        return link

    def _reply(self, origin: str, header: dict, tensors: list) -> None:
        link = self.incoming.get(origin)
        if link is None or link.closed is not None:
            log.warning("mesh: origin %s has no open link here; dropping its %s", origin, header.get("kind"))
            return
        link.send(header, tensors)

    # --- messages ----------------------------------------------------------------------------
    async def _on_message(self, link: Link, header: dict, tensors: list) -> None:
        kind = header.get("kind")
        if kind == "forward":
            await self._on_forward(header, tensors)
        elif kind == "close":
            keys = [(link.peer_b58, sid) for sid in header.get("sessions", [])]
            await asyncio.get_running_loop().run_in_executor(self._worker, self._free, keys)

    async def _on_forward(self, header: dict, tensors: list) -> None:
        step, origin = header.get("step"), header.get("origin")
        try:
            sessions, lens, starts = list(header["sessions"]), list(header["lens"]), list(header["starts"])
            hops = [(str(p), int(a), int(b)) for p, a, b in header["hops"]]
            wire = DTYPES[header.get("wire", "fp32")]
            x, positions = tensors
            _, a, b = hops[0]
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            return self._reply(str(origin), {"kind": "error", "step": step, "failed": None,
                                             "error": f"bad forward request: {exc!r}"}, [])
        if len(sessions) != len(lens) or len(lens) != len(starts) or x.dim() != 2 or x.shape[0] != sum(lens) \
                or tuple(positions.shape) != (x.shape[0],) or x.shape[1] != self.stage.args.hidden_size:
            return self._reply(origin, {"kind": "error", "step": step, "failed": None,
                                        "error": "bad forward request: shapes disagree"}, [])
        t0 = time.perf_counter()
        try:
            y = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._forward, origin, sessions, lens, starts, a, b, x, positions)
        except ValueError as exc:
            return self._reply(origin, {"kind": "error", "step": step, "failed": None, "error": str(exc)}, [])
        compute = time.perf_counter() - t0
        self.calls, self.rows, self.compute_s = self.calls + 1, self.rows + int(x.shape[0]), self.compute_s + compute
        self.served[(a, b)] = time.monotonic()
        y = y.to(wire)
        compute += float(header.get("compute_s", 0.0))  # the hops before us too: transport = wall - this
        if len(hops) == 1:
            return self._reply(origin, {"kind": "result", "step": step, "rows": int(y.shape[0]), "compute_s": compute},
                               [y])
        nxt = hops[1][0]
        try:
            link = await self._link_to(nxt)
            link.send(dict(header, hops=[list(h) for h in hops[1:]], compute_s=compute), [y, positions])
        except Exception as exc:
            self._reply(origin, {"kind": "error", "step": step, "failed": nxt, "error": f"next hop {nxt}: {exc}"}, [])

    def _forward(self, origin: str, sessions: list, lens: list, starts: list, a: int, b: int, x: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        if not self.stage.covers(a, b):
            raise ValueError(f"layers {a}:{b} are not built on this node")
        cache = self.caches.get((a, b))
        if cache is None:
            cache = self.caches[(a, b)] = self.stage.new_cache(self.kv, a, b)
        now = time.monotonic()
        seq_ids = []
        for sid, start in zip(sessions, starts):
            s = self.sessions.get((origin, sid))
            if s is None:
                if start != 0:
                    raise ValueError(f"unknown session {sid} (expired or this node restarted): replay from 0")
                s = self.sessions[(origin, sid)] = _Session(self._next_id, a, b, now)
                self._next_id += 1
                cache.add_sequence(s.seq_id)
            elif (s.start, s.end) != (a, b):
                raise ValueError(f"session {sid} runs layers {s.start}:{s.end}, not {a}:{b}")
            elif cache.length(s.seq_id) != start:
                raise ValueError(f"session {sid} out of sync: {cache.length(s.seq_id)} tokens cached, call starts at {start}")
            s.last_used = now
            seq_ids.append(s.seq_id)
        with torch.inference_mode():
            return self.stage.run(a, b, x.float(), positions, cache, BatchLayout(seq_ids, lens))  # [T, D]

    def _free(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            s = self.sessions.pop(key, None)
            if s is not None:
                self.caches[(s.start, s.end)].free_sequence(s.seq_id)

    async def _gc(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.session_ttl / 2))
            now = time.monotonic()
            idle = [k for k, s in list(self.sessions.items()) if now - s.last_used > self.session_ttl]
            if idle:
                await asyncio.get_running_loop().run_in_executor(self._worker, self._free, idle)
