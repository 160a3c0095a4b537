"""What a node reports about itself in its membership record (``moemesh mesh status``): its share,
its budget and expert-cache hit rate, the tokens per second it ran, and its links' latency.

``refresh`` runs before every heartbeat announcement, on the mesh loop (so it never waits on a
mesh call); ``probe`` pings the live peers once per
heartbeat (the round trip of an empty members-only call: the link latency `mesh status` shows).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from hivemind.p2p import PeerID

from .pipeline.slice import LoadedSlice
from .pipeline.stage import StageServer
from .shards.assign import describe
from .transport.membership import Membership, NodeRecord
from .transport.node import MeshNode

log = logging.getLogger("moemesh.mesh")


def free_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class NodeStatus:
    def __init__(self, node: MeshNode, slice_: LoadedSlice, stage: StageServer, record: NodeRecord) -> None:
        self.node, self.slice, self.stage, self.record = node, slice_, stage, record
        self.pipeline: Any = None  # PipelineModel on an API node
        self.expert_server: Any = None
        self.remote_experts: Any = None
        self._last = (time.monotonic(), 0)

    def _work(self) -> int:
        """Token rows this node has run: the API node's tokens, a stage's rows, an expert server's rows."""
        rows = self.stage.rows + (self.expert_server.rows if self.expert_server is not None else 0)
        return rows + (self.pipeline.tokens if self.pipeline is not None else 0)

    def serving(self) -> list[list[int]]:
        """The layer ranges this node runs now: stage ranges, and an API node's own segments."""
        ranges = set(self.stage.share())
        plan = self.pipeline.plan if self.pipeline is not None else None
        if plan:
            ranges |= {(s.start, s.end) for s in plan if s.local}
        return [list(r) for r in sorted(ranges)]

    def runs_layer(self, layer: int) -> bool:
        return any(a <= layer < b for a, b in self.serving())

    def refresh(self, record: NodeRecord) -> None:
        record.load = float(self.stage.load)
        record.free_memory = free_memory()
        now, work = time.monotonic(), self._work()
        t0, w0 = self._last
        self._last = (now, work)
        status: dict[str, Any] = {"serving": self.serving(), "tok_s": round((work - w0) / max(1e-9, now - t0), 2),
                                  "failovers": self.pipeline.failovers if self.pipeline is not None else 0}
        s = self.slice
        if s.budget is not None:
            status["budget"] = {"ram": s.budget.ram, "trunk": s.budget.trunk, "expert_cache": s.budget.expert_cache,
                                "slots": s.budget.slots}
        if s.lazy_experts is not None:
            st = s.lazy_experts.stats()
            status.update(hit_rate=st["hit_rate"], hits=st["hits"], misses=st["misses"], cache_bytes=st["cache_bytes"],
                          bytes_read=st["bytes_read"])
        if self.remote_experts is not None and s.args.moe_layers:
            layer = s.args.moe_layers[0]
            mine = [e for e in range(s.args.num_experts) if self.remote_experts.owns(layer, e, fetch=False)]
            status["experts"] = describe(mine, s.args.num_experts)
        status["bytes_sent"], status["bytes_received"] = self.node.stats.bytes_sent, self.node.stats.bytes_received
        status["links_ms"] = {p: round(1000 * st.rtt_s, 2) for p, st in self.node.stats.peers.items()
                              if st.rtt_s is not None}
        record.status = status

    async def probe(self, membership: Membership) -> None:
        """Ping every live peer once per heartbeat (on the mesh loop)."""
        while True:
            try:
                me = self.node.peer_id.to_base58()
                peers = [r.peer_id for r in await membership.live_nodes() if r.peer_id != me]
                await asyncio.gather(*(self._ping(p) for p in peers))
            except Exception as exc:  # status only: never fatal
                log.debug("mesh status probe: %s", exc)
            await asyncio.sleep(self.node.options.heartbeat)

    async def _ping(self, peer: str) -> None:
        try:
            await self.node.ping(PeerID.from_base58(peer), min(3.0, self.node.options.call_timeout))
        except Exception:
            self.node.stats.peer(peer).rtt_s = None
