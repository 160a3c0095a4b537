"""RemoteExperts: the ExpertProvider of expert-shard mode.

A layer's routed rows go to the experts this node holds (computed here) and to the other
experts' holders: ONE batched call per peer per layer (the distinct token rows, which rows each
expert takes, the routing weights), split only to stay under the message cap. The remote calls
are issued first, the local experts computed while they travel, then we wait. Every expert's
weighted rows are added into the output in expert-id order, the same additions in the same
order (experts/mixing.GroupedProvider), so with the fp32 wire the result is bit-identical to one
process. The experts this node holds are computed by a wrapped local provider of any kind
(resident, or lazy under a RAM budget).

Failover: experts are stateless, so a failed call (error, timeout, dial failure) marks that
peer failed until it announces again, and the same rows go to another holder of those experts.
No other holder -> MeshError naming the layer and experts. Every wait is bounded.
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

from ...experts.mixing import Group, GroupedProvider
from ..transport.membership import NodeRecord
from ..transport.node import MeshError, MeshNode
from ..transport.wire import NAMES, SAFE_PAYLOAD_BYTES
from .expert_server import RUN

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
    def __init__(self, local: GroupedProvider, held: dict[int, set[int]], node: MeshNode,
                 records: Callable[[], list[NodeRecord]], model_id: str, wire: torch.dtype = torch.float32,
                 refresh_s: float | None = None) -> None:
        # local computes the experts this node holds (held: layer -> expert ids); the rest go to peers
        self.local, self.held, self.node, self._fetch, self.model_id, self.wire = local, held, node, records, model_id, wire
        self.refresh_s = node.options.heartbeat if refresh_s is None else refresh_s
        self.failed: dict[str, float] = {}  # peer id -> DHT time it failed us
        self.failovers = 0
        self.remote_rows = 0  # (token, expert) pairs computed elsewhere
        self.local_rows = 0
        self._records: list[NodeRecord] = []
        self._fetched_at = -1e9

    # --- who holds what ----------------------------------------------------------------------
    def _live(self, force: bool = False) -> list[NodeRecord]:
        if force or time.monotonic() - self._fetched_at > self.refresh_s:
            self._records, self._fetched_at = self._fetch(), time.monotonic()
        return [r for r in self._records if r.time > self.failed.get(r.peer_id, -1.0)]

    def holders(self, layer: int, expert: int, exclude: set[str] = frozenset()) -> list[NodeRecord]:
        me = self.node.peer_id.to_base58() if self.node.peer_id is not None else ""
        return [r for r in self._live() if r.model == self.model_id and r.peer_id != me and r.peer_id not in exclude
                and r.layers[0] <= layer < r.layers[1] and (r.experts is None or expert in r.experts)]

    def assign(self, layer: int, experts: list[int], exclude: set[str] = frozenset()) -> dict[str, list[int]]:
        """peer -> experts, fewest peers first (greedy: the peer holding most of what is left)."""
        by_expert = {e: self.holders(layer, e, exclude) for e in experts}
        if any(not h for h in by_expert.values()):  # maybe a holder joined since the last refresh
            self._live(force=True)
            by_expert = {e: self.holders(layer, e, exclude) for e in experts}
        missing = [e for e, h in by_expert.items() if not h]
        if missing:
            raise MeshError(f"layer {layer}: no live node holds experts {missing}"
                            + (f" (failed: {len(exclude)} node(s))" if exclude else ""))
        load = {r.peer_id: r.load for h in by_expert.values() for r in h}
        left, out = set(experts), {}
        while left:
            cover: dict[str, list[int]] = {}
            for e in left:
                for r in by_expert[e]:
                    cover.setdefault(r.peer_id, []).append(e)
            peer = max(cover, key=lambda p: (len(cover[p]), -load[p], p))
            out[peer] = sorted(cover[peer])
            left -= set(cover[peer])
        return out

    # --- the provider call -------------------------------------------------------------------
    def weighted_outputs(self, layer: int, x: torch.Tensor, groups: list[Group], flat_w: torch.Tensor) -> list[torch.Tensor]:
        # x: [T, D]; groups in expert-id order -> each expert's weighted rows [n, D]
        held = self.held.get(layer, set())
        mine = [g for g in groups if g[0] in held]
        away = [g for g in groups if g[0] not in held]
        pending, plan = None, {}
        if away:  # issue the remote calls first, compute ours while they travel
            plan = self._plan(layer, x, flat_w, away, set())
            pending = asyncio.run_coroutine_threadsafe(self._gather_layer(layer, plan), self.node.loop)
        ys: dict[int, torch.Tensor] = {}
        if mine:
            ys.update(zip([g[0] for g in mine], self.local.weighted_outputs(layer, x, mine, flat_w)))
            self.local_rows += sum(int(g[1].shape[0]) for g in mine)
        if pending is not None:
            ys.update(self._wait(layer, x, flat_w, away, plan, pending))
        return [ys[e] for e, _, _ in groups]

    def _plan(self, layer: int, x: torch.Tensor, flat_w: torch.Tensor, groups: list[Group],
              exclude: set[str]) -> dict[str, tuple[list[Group], list[ExpertCall]]]:
        by_id = {g[0]: g for g in groups}
        plan = {}
        for peer, experts in self.assign(layer, [g[0] for g in groups], exclude).items():
            mine = [by_id[e] for e in experts]
            plan[peer] = (mine, build_calls(x, flat_w, mine, self.wire))
        return plan

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
            self.node.stats.add(time.perf_counter() - t0, float(out.get("compute_s", 0.0)))
            if out.get("rows") != n or len(tensors) != 1 or tuple(tensors[0].shape) != (n, c.x.shape[1]):
                raise MeshError(f"experts at {peer} answered an incomplete reply")
            return tensors[0]

        return list(await asyncio.gather(*(one(c) for c in calls)))

    def _wait(self, layer: int, x: torch.Tensor, flat_w: torch.Tensor, groups: list[Group], plan: dict,
              pending: concurrent.futures.Future) -> dict[int, torch.Tensor]:
        timeout = self._timeout(plan)
        try:
            results = pending.result(timeout)
        except concurrent.futures.TimeoutError:
            pending.cancel()
            results = {p: MeshError(f"no answer in {timeout:.1f}s") for p in plan}
        ys: dict[int, torch.Tensor] = {}
        tried: set[str] = set()
        while True:
            retry: list[Group] = []
            for peer, result in results.items():
                mine, calls = plan[peer]
                if isinstance(result, BaseException):
                    log.warning("mesh: experts %s of layer %d at %s failed (%s); trying another holder",
                                [g[0] for g in mine], layer, peer, result)
                    self.failed[peer] = get_dht_time()
                    tried.add(peer)
                    retry += mine
                    continue
                self._unpack(ys, calls, result)
                self.remote_rows += sum(int(g[1].shape[0]) for g in mine)
            if not retry:
                return ys
            retry.sort(key=lambda g: g[0])
            try:
                plan = self._plan(layer, x, flat_w, retry, tried)
            except MeshError as exc:
                raise MeshError(f"{exc}: node(s) {sorted(tried)} failed and no other live node holds them") from None
            self.failovers += 1
            try:
                results = self.node.run(self._gather_layer(layer, plan), self._timeout(plan))
            except MeshError as exc:  # the whole retry timed out: every peer of it failed
                results = {p: exc for p in plan}

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
