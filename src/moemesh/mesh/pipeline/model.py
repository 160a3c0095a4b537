"""PipelineModel: the engine's model when layers live on other nodes.

Same contract as ``Transformer.forward(tokens, positions, cache, batch)``: embed here, run each
sequence's route (route.py), then norm, head -> logits. A route is fixed per sequence when it first
runs (new sequences get the current plan); sequences that share a route go together, one message
per chain per step. Our own segments run here on one KV cache per layer range; a run of
consecutive remote segments is one chain (chain.py): the rows go to the first hop, each hop
passes its output to the next, and the last hop returns the hidden state straight to us.

Failover by re-planning: the cache keeps every token a sequence was fed. When a step fails, the
peer to blame (a broken link, an unreachable next hop, or a peer that does not answer a ping after
a timeout) is left out of plans until it announces again; the affected sequences drop all their
sessions and are replayed (prefilled again from their tokens) on a new plan, where the survivors
take over the missing layers (elastic nodes) or a replica of the same range does. No route left ->
MeshError naming the layers.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from ...batch import BatchLayout
from ...errors import MoemeshError
from ...kvcache.base import KVCache
from ...models.args import ModelArgs
from ..transport.membership import Membership, NodeRecord
from ..transport.node import MeshError, MeshNode
from .chain import ChainClient, ChainError
from .route import Candidate, NoRoute, Segment, candidates, plan_route
from .slice import Ends, StageLayers

log = logging.getLogger("moemesh.mesh")
PROBE_TIMEOUT_S = 3.0  # a peer that does not answer a ping within this is blamed for a lost step


@dataclass
class _SeqState:
    tokens: list[torch.Tensor] = field(default_factory=list)  # every chunk fed [n_i] (for a replay)
    positions: list[torch.Tensor] = field(default_factory=list)
    route: tuple[Segment, ...] | None = None
    session: str = ""  # its session id at every remote hop of the route
    done: int = 0  # tokens through the current route (every hop's session length)
    local: set[tuple[int, int]] = field(default_factory=set)  # local layer ranges holding it


class PipelineCache(KVCache):
    """Per sequence: its tokens, its route and sessions; one KV cache per local layer range."""

    def __init__(self, model: "PipelineModel", kv: str) -> None:
        self.model, self.kv = model, kv
        self.ranges: dict[tuple[int, int], KVCache] = {}
        self.seqs: dict[int, _SeqState] = {}

    def add_sequence(self, seq_id: int) -> None:
        self.seqs[seq_id] = _SeqState()

    def free_sequence(self, seq_id: int) -> None:
        state = self.seqs.pop(seq_id, None)
        if state is not None:
            self.reset(seq_id, state)

    def reset(self, seq_id: int, state: _SeqState) -> None:
        """Drop the sequence's KV everywhere (local ranges, remote sessions); keep its tokens."""
        for r in state.local:
            self.ranges[r].free_sequence(seq_id)
        if state.route is not None:
            for peer in {s.peer for s in state.route if s.peer is not None}:
                self.model.node.spawn(self.model.chain.close_sessions(peer, [state.session]))
        state.local, state.route, state.done = set(), None, 0

    def range_cache(self, a: int, b: int, seq_ids: list[int]) -> KVCache:
        cache = self.ranges.get((a, b))
        if cache is None:
            assert self.model.local is not None
            cache = self.ranges[(a, b)] = self.model.local.new_cache(self.kv, a, b)
        for sid in seq_ids:
            if (a, b) not in self.seqs[sid].local:
                cache.add_sequence(sid)
                self.seqs[sid].local.add((a, b))
        return cache  # StageLayers.run sees it through a RangeCache

    def route_peers(self, seq_id: int) -> list[str | None]:
        state = self.seqs[seq_id]
        return [] if state.route is None else [s.peer for s in state.route]

    def length(self, seq_id: int) -> int:
        return sum(int(t.shape[0]) for t in self.seqs[seq_id].tokens)

    def attend(self, layer, q, k, v, batch, scale, window=None, sinks=None):
        raise RuntimeError("PipelineModel runs its own layers on per-range caches")

    def end(self, batch: BatchLayout) -> None:
        pass

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.ranges.values())


class PipelineModel(torch.nn.Module):
    def __init__(self, args: ModelArgs, model_id: str, ends: Ends, local: StageLayers | None, node: MeshNode,
                 membership: Membership, wire: torch.dtype = torch.float32, me: Candidate | None = None) -> None:
        super().__init__()
        self.args, self.model_id, self.ends, self.local = args, model_id, ends, local
        self.node, self.membership, self.wire = node, membership, wire
        self.me = me if me is not None else (Candidate(None, (local.start, local.end)) if local is not None else None)
        self.layers = local.layers if local is not None else []  # ExpertProviders for /metrics
        self.chain = ChainClient(node)
        self.plan: list[Segment] | None = None  # the latest plan (new sequences take it)
        self.failed: dict[str, float] = {}  # peer id -> DHT-clock time it failed us
        self.failovers = 0  # steps that were replayed on a new plan
        self.tokens = 0  # tokens run (status: tok/s)
        self._records: list[NodeRecord] = []
        self._fetched_at = -1e9

    def new_cache(self, kv: str = "dense") -> PipelineCache:
        return PipelineCache(self, kv)

    # --- planning ----------------------------------------------------------------------------
    def _live(self, force: bool = False) -> list[NodeRecord]:
        if force or time.monotonic() - self._fetched_at > self.node.options.heartbeat:
            self._records, self._fetched_at = self.node.run(self.membership.live_nodes(), 10.0), time.monotonic()
        # a peer that failed us is out until it announces again after the failure
        return [r for r in self._records if r.time > self.failed.get(r.peer_id, -1.0)]

    def new_plan(self, force: bool = False) -> list[Segment]:
        others = candidates(self._live(force), self.model_id, self.args.num_layers, self.node.peer_id.to_base58())
        try:
            self.plan = plan_route(self.args.num_layers, self.me, others)
        except NoRoute as exc:
            raise MoemeshError(f"mesh: {exc}") from None
        return self.plan

    def current_plan(self) -> list[Segment]:
        """The latest plan while the listing it came from is fresh (one heartbeat), else a new one."""
        if self.plan is None or time.monotonic() - self._fetched_at > self.node.options.heartbeat:
            return self.new_plan()
        return self.plan

    # --- forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: PipelineCache, batch: BatchLayout,
                all_logits: bool = False) -> torch.Tensor:
        """tokens, positions: [T] -> logits [T, V] if all_logits else [B, V]."""
        rows = [slice(o, o + n) for o, n in zip(batch.offsets, batch.query_lens)]
        groups: dict[tuple[Segment, ...], list[int]] = {}
        for i, sid in enumerate(batch.seq_ids):
            state = cache.seqs[sid]
            state.tokens.append(tokens[rows[i]].clone())
            state.positions.append(positions[rows[i]].clone())
            if state.route is None:
                state.route, state.session = tuple(self.current_plan()), uuid.uuid4().hex
            groups.setdefault(state.route, []).append(i)
        x = torch.empty(int(tokens.shape[0]), self.args.hidden_size)  # [T, D]
        for members in groups.values():
            sids = [batch.seq_ids[i] for i in members]
            y = self._step(sids, [tokens[rows[i]] for i in members], [positions[rows[i]] for i in members], cache)
            offset = 0
            for i in members:
                n = batch.query_lens[i]
                x[rows[i]] = y[offset : offset + n]
                offset += n
        self.tokens += int(tokens.shape[0])
        if not all_logits:
            x = x[batch.last_token_indices()]  # [B, D]
        return self.ends.head(self.ends.norm(x))

    def _step(self, sids: list[int], toks: list[torch.Tensor], pos: list[torch.Tensor],
              cache: PipelineCache) -> torch.Tensor:
        """This step's rows of sequences sharing a route -> hidden states [sum n, D]; replays on failure."""
        attempts, t0 = 0, time.monotonic()
        while True:
            route = cache.seqs[sids[0]].route
            try:
                if attempts == 0:
                    return self._run(route, sids, toks, pos, cache)  # type: ignore[arg-type]
                # replay: every token of each sequence through its new route, keep this step's rows
                full = [torch.cat(cache.seqs[s].tokens) for s in sids]
                y = self._run(route, sids, full, [torch.cat(cache.seqs[s].positions) for s in sids], cache)  # type: ignore[arg-type]
                self.failovers += 1
                log.warning("mesh: replayed %d sequence(s) in %.2fs", len(sids), time.monotonic() - t0)
                ends = torch.cumsum(torch.tensor([int(t.shape[0]) for t in full]), 0).tolist()
                return torch.cat([y[e - int(t.shape[0]) : e] for e, t in zip(ends, toks)])
            except ChainError as exc:
                attempts += 1
                blamed = self._blame(exc, route)
                if attempts > 2 + len(self._records):
                    raise MeshError(f"layers {self._span(route)}: giving up after {attempts} attempts: {exc}") from None
                try:
                    plan = self.new_plan(force=True)
                except MoemeshError:
                    raise MeshError(f"layers {self._span(route)}: node(s) {sorted(blamed) or '?'} failed ({exc}) and "
                                    f"no other live node serves them") from None
                log.warning("mesh: step failed (%s); replaying %d sequence(s) on %s", exc, len(sids), _show(plan))
                for sid in sids:
                    state = cache.seqs[sid]
                    cache.reset(sid, state)
                    state.route, state.session = tuple(plan), uuid.uuid4().hex

    def _run(self, route: tuple[Segment, ...], sids: list[int], toks: list[torch.Tensor], pos: list[torch.Tensor],
             cache: PipelineCache) -> torch.Tensor:
        lens = [int(t.shape[0]) for t in toks]
        positions = torch.cat(pos)  # [T]
        x = self.ends.embed[torch.cat(toks)].float()  # [T, D]
        starts = [cache.seqs[s].done for s in sids]
        i = 0
        while i < len(route):
            seg = route[i]
            if seg.local:
                assert self.local is not None
                x = self.local.run(seg.start, seg.end, x, positions, cache.range_cache(seg.start, seg.end, sids),
                                   BatchLayout(sids, lens))
                i += 1
                continue
            j = i
            while j < len(route) and not route[j].local:
                j += 1
            hops = [(s.peer, s.start, s.end) for s in route[i:j]]
            sessions = [cache.seqs[s].session for s in sids]
            timeout = self._timeout(len(hops), int(x.shape[0]))
            y = self.node.run(self.chain.run(hops, sessions, lens, starts, x.to(self.wire), positions, timeout),
                              timeout + 5.0)  # type: ignore[arg-type]
            x = y.float()
            i = j
        for s, n in zip(sids, lens):
            cache.seqs[s].done += n
        return x

    def _timeout(self, hops: int, rows: int) -> float:
        o = self.node.options
        return o.call_timeout + o.per_row_timeout * rows * hops + hops * o.test_delay_ms / 1000

    def _blame(self, exc: ChainError, route: tuple[Segment, ...] | None) -> set[str]:
        """Who failed us: the peer the error names, else the route's peers that do not answer a ping."""
        if exc.refused:
            return set()
        blamed = {exc.failed} if exc.failed else set()
        if not blamed and route is not None:
            peers = [s.peer for s in route if s.peer is not None]
            results = self.node.run(self._pings(peers), PROBE_TIMEOUT_S + 5.0)
            blamed = {p for p, ok in zip(peers, results) if not ok}
        for peer in blamed:
            self.failed[peer] = get_dht_time()
        return blamed

    async def _pings(self, peers: list[str]) -> list[bool]:
        async def one(p: str) -> bool:
            try:
                await self.node.ping(PeerID.from_base58(p), min(PROBE_TIMEOUT_S, self.node.options.call_timeout))
                return True
            except Exception:
                return False

        return list(await asyncio.gather(*(one(p) for p in peers)))

    @staticmethod
    def _span(route: tuple[Segment, ...] | None) -> str:
        remote = [s for s in route or () if not s.local]
        return ", ".join(f"{s.start}:{s.end}" for s in remote) or "?"

    def close(self) -> None:
        self.node.loop.call_soon_threadsafe(self.chain.close)


def _show(plan: list[Segment]) -> str:
    return " -> ".join(f"{s.start}:{s.end}@{'here' if s.local else s.peer[-8:]}" for s in plan)  # type: ignore[index]
