"""RemoteExperts: the ExpertProvider of expert-shard mode.

A layer's routed rows go to the experts this node holds (computed here) and to the other
experts' holders: ONE batched call per peer per layer (the distinct token rows, which rows each
expert takes, the routing weights), split only to stay under the message cap. The remote calls
are issued first, the local experts computed while they travel, then we wait. Every expert's
weighted rows are added into the output in expert-id order, the same additions in the same
order (experts/mixing.GroupedProvider), so with the fp32 wire the result is bit-identical to one
process. The experts this node holds are computed by a wrapped local provider of any kind
(resident, or lazy under a RAM budget).

Who computes which expert: owners.py (our share here, declared holders, then the elastic nodes by
weighted rendezvous). Failover: experts are stateless, so a failed call (error, timeout, dial
failure) marks that peer failed until it announces again, and its rows are re-planned: another
holder, or the elastic survivors (this node included) take its share over. No one left -> MeshError
naming the layer and experts. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from ...errors import MoemeshError
from ...experts.mixing import Group, GroupedProvider
from ..transport.membership import NodeRecord
from ..transport.node import MeshError, MeshNode
from ..transport.wire import NAMES, SAFE_PAYLOAD_BYTES
from .expert_server import RUN
from .owners import Holder, assign, holders

log = logging.getLogger("moemesh.mesh")


@dataclass
class ExpertCall:
    """One message to one peer: experts in id order, each with its rows of x."""

    experts: list[int]
    counts: list[int]
    x: torch.Tensor  # [n, D] distinct token rows, wire dtype
    rows: torch.Tensor  # [N] int64 into x
    weights: torch.Tensor  # [N] fp32


def build_calls(x: torch.Tensor, flat_w: torch.Tensor, groups: list[Group], wire: torch.dtype) -> list[ExpertCall]:
    """Pack ``groups`` (id order) into messages under the cap (send and reply both). One expert's
    rows are never split unless they alone exceed the cap (then exactness is not guaranteed:
    the matmul sees fewer rows; > ~190 rows of D=4096 on one expert)."""
    row_bytes = x.shape[1] * max(4, torch.empty((), dtype=wire).element_size())
    max_rows = max(1, SAFE_PAYLOAD_BYTES // row_bytes)
    pieces: list[list[Group]] = [[]]
    used = 0
    for e, tok, slots in groups:
        for start in range(0, tok.shape[0], max_rows):
            part = (e, tok[start : start + max_rows], slots[start : start + max_rows])
            n = part[1].shape[0]
            if used + n > max_rows and pieces[-1]:
                pieces.append([])
                used = 0
            pieces[-1].append(part)
            used += n
    calls = []
    for piece in pieces:
        tok = torch.cat([t for _, t, _ in piece])  # [N]
        uniq, rows = torch.unique(tok, return_inverse=True)  # sorted distinct tokens; rows into them
        calls.append(ExpertCall([e for e, _, _ in piece], [int(t.shape[0]) for _, t, _ in piece],
                                x[uniq].to(wire), rows, torch.cat([flat_w[s] for _, _, s in piece]).float()))
    return calls


class RemoteExperts(GroupedProvider):
    def __init__(self, local: GroupedProvider, me: Holder, node: MeshNode, records: Callable[[], list[NodeRecord]],
                 model_id: str, wire: torch.dtype = torch.float32, refresh_s: float | None = None) -> None:
        # local computes the experts assigned to this node (me: its share, owners.py); the rest go to peers
        self.local, self.me, self.node, self._fetch, self.model_id, self.wire = local, me, node, records, model_id, wire
        self.refresh_s = node.options.heartbeat if refresh_s is None else refresh_s
        self.failed: dict[str, float] = {}  # peer id -> DHT time it failed us
        self.failovers = 0
        self.remote_rows = 0  # (token, expert) pairs computed elsewhere
        self.local_rows = 0
        self._records: list[NodeRecord] = []
        self._fetched_at = -1e9

    # --- who computes what -------------------------------------------------------------------
    def _live(self, force: bool = False, fetch: bool = True) -> list[NodeRecord]:
        if fetch and (force or time.monotonic() - self._fetched_at > self.refresh_s):
            self._records, self._fetched_at = self._fetch(), time.monotonic()
        return [r for r in self._records if r.time > self.failed.get(r.peer_id, -1.0)]

    def assign(self, layer: int, experts: list[int], exclude: set[str] = frozenset(),
               fetch: bool = True) -> dict[str, list[int]]:
        """peer -> experts (``self.me.peer`` for ours); MeshError when some expert has no live holder.
        ``fetch=False``: from the listing already fetched (on the mesh loop, which must not wait on itself)."""
        for force in (False, True) if fetch else (False,):  # a holder may have joined since the last refresh
            others = [h for h in holders(self._live(force, fetch), self.model_id, layer, exclude)
                      if h.peer != self.me.peer]
            try:
                return assign(layer, experts, self.me, others)
            except MoemeshError as exc:
                error = exc
        raise MeshError(f"{error}" + (f" (failed: {len(exclude)} node(s))" if exclude else ""))

    def owns(self, layer: int, expert: int, fetch: bool = True) -> bool:
        """Whether this node computes ``expert`` of ``layer`` under the current plan (prefetch filter)."""
        try:
            return self.me.peer in self.assign(layer, [expert], fetch=fetch)
        except MeshError:
            return False

    # --- the provider call -------------------------------------------------------------------
    def weighted_outputs(self, layer: int, x: torch.Tensor, groups: list[Group], flat_w: torch.Tensor) -> list[torch.Tensor]:
        # x: [T, D]; groups in expert-id order -> each expert's weighted rows [n, D]
        by_id = {g[0]: g for g in groups}
        ys: dict[int, torch.Tensor] = {}
        tried: set[str] = set()
        assigned = self.assign(layer, list(by_id))
        while True:
            mine = [by_id[e] for e in assigned.pop(self.me.peer, [])]
            plan = {peer: ([by_id[e] for e in es], build_calls(x, flat_w, [by_id[e] for e in es], self.wire))
                    for peer, es in assigned.items()}
            pending = None
            if plan:  # issue the remote calls first, compute ours while they travel
                pending = asyncio.run_coroutine_threadsafe(self._gather_layer(layer, plan), self.node.loop)
            if mine:
                ys.update(zip([g[0] for g in mine], self.local.weighted_outputs(layer, x, mine, flat_w)))
                self.local_rows += sum(int(g[1].shape[0]) for g in mine)
            retry = self._collect(layer, plan, pending, ys, tried) if pending is not None else []
            if not retry:
                return [ys[e] for e, _, _ in groups]
            try:
                assigned = self.assign(layer, sorted(retry), tried)
            except MeshError as exc:
                raise MeshError(f"{exc}: node(s) {sorted(tried)} failed and no other live node holds them") from None
            self.failovers += 1

    def _collect(self, layer: int, plan: dict, pending: concurrent.futures.Future, ys: dict[int, torch.Tensor],
                 tried: set[str]) -> list[int]:
        """Unpack the replies into ``ys``; mark failed peers -> the experts to send elsewhere."""
        timeout = self._timeout(plan)
        try:
            results = pending.result(timeout)
        except concurrent.futures.TimeoutError:
            pending.cancel()
            results = {p: MeshError(f"no answer in {timeout:.1f}s") for p in plan}
        retry: list[int] = []
        for peer, result in results.items():
            mine, calls = plan[peer]
            if isinstance(result, BaseException):
                log.warning("mesh: experts %s of layer %d at %s failed (%s); re-planning",
                            [g[0] for g in mine], layer, peer, result)
                self.failed[peer] = get_dht_time()
                tried.add(peer)
                retry += [g[0] for g in mine]
                continue
            self._unpack(ys, calls, result)
            self.remote_rows += sum(int(g[1].shape[0]) for g in mine)
        return retry

    def _timeout(self, plan: dict) -> float:
        o = self.node.options
        rows = max((int(c.rows.shape[0]) for _, calls in plan.values() for c in calls), default=0)
        # handshake + call, each bounded by the call timeout (node.call); a margin for the loop
        return 2 * (o.call_timeout + o.per_row_timeout * rows) + o.test_delay_ms / 1000 + 5.0

    async def _call_peer(self, layer: int, peer: str, calls: list[ExpertCall]) -> list[torch.Tensor]:
        o = self.node.options
        pid = PeerID.from_base58(peer)

        async def one(c: ExpertCall) -> torch.Tensor:
            n = int(c.rows.shape[0])
            header = {"layer": layer, "experts": c.experts, "counts": c.counts, "wire": NAMES[self.wire]}
            t0 = time.perf_counter()
            out, tensors = await self.node.call(pid, RUN, header, [c.x, c.rows, c.weights],
                                                o.call_timeout + o.per_row_timeout * n)
            self.node.stats.add(time.perf_counter() - t0, float(out.get("compute_s", 0.0)), peer=peer)
            if out.get("rows") != n or len(tensors) != 1 or tuple(tensors[0].shape) != (n, c.x.shape[1]):
                raise MeshError(f"experts at {peer} answered an incomplete reply")
            return tensors[0]

        return list(await asyncio.gather(*(one(c) for c in calls)))

    async def _gather_layer(self, layer: int, plan: dict) -> dict[str, list[torch.Tensor] | BaseException]:
        peers = list(plan)
        outs = await asyncio.gather(*(self._call_peer(layer, p, plan[p][1]) for p in peers), return_exceptions=True)
        return dict(zip(peers, outs))

    @staticmethod
    def _unpack(ys: dict[int, torch.Tensor], calls: list[ExpertCall], outs: list[torch.Tensor]) -> None:
        """Each call's reply rows [N, D] -> per-expert [n_e, D] (an expert split over calls is joined)."""
        parts: dict[int, list[torch.Tensor]] = {}
        for c, y in zip(calls, outs):
            offset = 0
            for e, n in zip(c.experts, c.counts):
                parts.setdefault(e, []).append(y[offset : offset + n].float())
                offset += n
        for e, p in parts.items():
            ys[e] = p[0] if len(p) == 1 else torch.cat(p)

    def stats(self) -> dict:
        return {"remote_rows": self.remote_rows, "local_rows": self.local_rows, "failovers": self.failovers}
