"""PipelineModel: the engine's model when layers live on other nodes.

Same contract as ``Transformer.forward(tokens, positions, cache, batch)``: embed here, run each
segment of the route (our own layers locally, the others on peers, one call per peer per
segment per step carrying every sequence of the batch), then norm, head -> logits.

Failover: the cache (PipelineCache) remembers, per sequence and remote segment, every input row
already sent. When a peer fails (error, timeout, incomplete reply), its sequences move to a
live replica of the same layer range: a new session there is prefilled with the stored rows
plus this step's rows, and decoding goes on. No replica -> MeshError naming the layers.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from ...batch import BatchLayout
from ...errors import MoemeshError
from ...kvcache.base import KVCache
from ...models.args import ModelArgs
from ..transport.membership import Membership, NodeRecord
from ..transport.node import MeshError, MeshNode
from . import remote
from .route import NoRoute, Segment, plan_route, replicas
from .slice import Ends, StageLayers

log = logging.getLogger("moemesh.mesh")


@dataclass
class _Remote:
    """One sequence's state on one remote segment."""

    peer: str
    session: str
    sent: list[torch.Tensor] = field(default_factory=list)  # input rows already sent [n_i, D], wire dtype
    positions: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(int(p.shape[0]) for p in self.positions)


class PipelineCache(KVCache):
    """The local layers' KV cache plus each sequence's remote sessions (closed on free)."""

    def __init__(self, local: KVCache | None, model: "PipelineModel") -> None:
        self.local, self.model = local, model
        self.remote: dict[int, dict[int, _Remote]] = {}  # seq_id -> segment index -> state
        self.lengths: dict[int, int] = {}

    def add_sequence(self, seq_id: int) -> None:
        if self.local is not None:
            self.local.add_sequence(seq_id)
        self.remote[seq_id], self.lengths[seq_id] = {}, 0

    def free_sequence(self, seq_id: int) -> None:
        if self.local is not None:
            self.local.free_sequence(seq_id)
        self.lengths.pop(seq_id, None)
        for state in self.remote.pop(seq_id, {}).values():
            self.model.close_session(state)

    def length(self, seq_id: int) -> int:
        return self.lengths[seq_id]

    def begin(self, batch: BatchLayout) -> None:
        if self.local is not None:
            self.local.begin(batch)

    def attend(self, layer, q, k, v, batch, scale, window=None, sinks=None):
        assert self.local is not None
        if sinks is not None:  # gpt_oss
            return self.local.attend(layer, q, k, v, batch, scale, window, sinks=sinks)
        return self.local.attend(layer, q, k, v, batch, scale, window)

    def end(self, batch: BatchLayout) -> None:
        if self.local is not None:
            self.local.end(batch)

    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for s in self.remote.values() for r in s.values() for t in r.sent)
        return (self.local.nbytes() if self.local is not None else 0) + held


class PipelineModel(torch.nn.Module):
    def __init__(self, args: ModelArgs, model_id: str, ends: Ends, local: StageLayers | None, node: MeshNode,
                 membership: Membership, wire: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.args, self.model_id, self.ends, self.local = args, model_id, ends, local
        self.node, self.membership, self.wire = node, membership, wire
        self.layers = local.layers if local is not None else []  # ExpertProviders for /metrics
        self.plan: list[Segment] | None = None
        self.failed: dict[str, float] = {}  # peer id -> DHT-clock time it failed us
        self.failovers = 0
        self._records: list[NodeRecord] = []

    def new_cache(self, kv: str = "dense") -> PipelineCache:
        return PipelineCache(self.local.new_cache(kv) if self.local is not None else None, self)

    # --- membership ------------------------------------------------------------------------
    def _live(self, timeout: float = 10.0) -> list[NodeRecord]:
        records = self.node.run(self.membership.live_nodes(), timeout)
        # a peer that failed us is out until it announces again after the failure
        self._records = [r for r in records if r.time > self.failed.get(r.peer_id, -1.0)]
        return self._records

    def _ensure_plan(self, cache: PipelineCache) -> list[Segment]:
        """Plan when idle (no sequence mid-route), so all sequences of a batch share one plan."""
        busy = any(cache.remote[s] for s in cache.remote)
        if self.plan is None or not busy:
            local = (self.local.start, self.local.end) if self.local is not None else None
            try:
                self.plan = plan_route(self.args.num_layers, local, self._live(), self.model_id, self._self_id())
            except NoRoute as exc:
                raise MoemeshError(f"mesh: {exc}") from None
        return self.plan

    def _self_id(self) -> str:
        assert self.node.peer_id is not None
        return self.node.peer_id.to_base58()

    def _pick(self, seg: Segment, exclude: set[str]) -> NodeRecord | None:
        found = replicas(self._records, seg, self.model_id, self._self_id(), exclude)
        return found[0] if found else None

    # --- forward ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: PipelineCache, batch: BatchLayout,
                all_logits: bool = False) -> torch.Tensor:
        """tokens, positions: [T] -> logits [T, V] if all_logits else [B, V]."""
        plan = self._ensure_plan(cache)
        x = self.ends.embed[tokens].float()  # [T, D]
        for index, seg in enumerate(plan):
            if seg.local:
                assert self.local is not None and cache.local is not None
                x = self.local(x, positions, cache.local, batch)
            else:
                x = self._remote(index, seg, x, positions, cache, batch)
        for sid, n in zip(batch.seq_ids, batch.query_lens):
            cache.lengths[sid] += n
        if not all_logits:
            x = x[batch.last_token_indices()]  # [B, D]
        return self.ends.head(self.ends.norm(x))

    def _remote(self, index: int, seg: Segment, x: torch.Tensor, positions: torch.Tensor, cache: PipelineCache,
                batch: BatchLayout) -> torch.Tensor:
        xw = x.to(self.wire)  # [T, D]
        by_peer: dict[str, list[int]] = {}
        for i, sid in enumerate(batch.seq_ids):
            state = cache.remote[sid].get(index)
            if state is None:
                rec = self._pick(seg, set()) or (self._live() and self._pick(seg, set()))
                if rec is None:
                    raise MoemeshError(f"mesh: no live node serves layers {seg.start}:{seg.end}")
                state = cache.remote[sid][index] = _Remote(rec.peer_id, uuid.uuid4().hex)
            by_peer.setdefault(state.peer, []).append(i)
        rows = [slice(o, o + n) for o, n in zip(batch.offsets, batch.query_lens)]
        calls = {}
        for peer, members in by_peer.items():
            states = [cache.remote[batch.seq_ids[i]][index] for i in members]
            calls[peer] = remote.StageCall(
                [s.session for s in states], [batch.query_lens[i] for i in members], [s.length for s in states],
                torch.cat([xw[rows[i]] for i in members]), torch.cat([positions[rows[i]] for i in members]))
        results = self.node.run(self._gather(calls), self._timeout(calls))
        out = torch.empty_like(xw)
        for peer, members in by_peer.items():
            y = results[peer]
            if isinstance(y, Exception):
                y = self._failover(index, seg, peer, y, [batch.seq_ids[i] for i in members], calls[peer], cache)
            offset = 0
            for i in members:
                n = batch.query_lens[i]
                out[rows[i]] = y[offset : offset + n]
                offset += n
                state = cache.remote[batch.seq_ids[i]][index]
                state.sent.append(xw[rows[i]].clone())
                state.positions.append(positions[rows[i]].clone())
        return out.float()

    def _timeout(self, calls: dict[str, remote.StageCall]) -> float:
        rows = max((c.x.shape[0] for c in calls.values()), default=0)
        o = self.node.options
        return 2 * (o.call_timeout + o.per_row_timeout * rows) + o.test_delay_ms / 1000 + 5.0

    async def _gather(self, calls: dict[str, remote.StageCall]) -> dict[str, torch.Tensor | Exception]:
        peers = list(calls)
        outs = await asyncio.gather(*(remote.forward(self.node, PeerID.from_base58(p), calls[p]) for p in peers),
                                    return_exceptions=True)
        return dict(zip(peers, outs))

    def _failover(self, index: int, seg: Segment, peer: str, error: Exception, seq_ids: list[int],
                  call: remote.StageCall, cache: PipelineCache) -> torch.Tensor:
        """Move ``seq_ids`` off ``peer`` onto a replica: prefill there with every row sent so far
        plus this step's rows; returns this step's outputs [T, D] in call order."""
        log.warning("mesh: layers %d:%d at %s failed (%s); failing over", seg.start, seg.end, peer, error)
        t0 = time.monotonic()
        self.failed[peer] = self._now()
        tried = {peer}
        self._live()
        while True:
            rec = self._pick(seg, tried)
            if rec is None:
                raise MeshError(f"layers {seg.start}:{seg.end}: node {peer} failed ({error}) and no other live node "
                                f"serves them (tried {len(tried)})")
            tried.add(rec.peer_id)
            states = [cache.remote[sid][index] for sid in seq_ids]
            replay, offset = [], 0
            for state, n in zip(states, call.lens):
                replay.append(remote.StageCall(
                    [uuid.uuid4().hex], [state.length + n], [0],
                    torch.cat(state.sent + [call.x[offset : offset + n]]),
                    torch.cat(state.positions + [call.positions[offset : offset + n]])))
                offset += n
            merged = remote.StageCall([c.sessions[0] for c in replay], [c.lens[0] for c in replay], [0] * len(replay),
                                      torch.cat([c.x for c in replay]), torch.cat([c.positions for c in replay]))
            try:
                y = self.node.run(remote.forward(self.node, PeerID.from_base58(rec.peer_id), merged),
                                  self._timeout({rec.peer_id: merged}))
            except MoemeshError as exc:
                log.warning("mesh: replica %s failed too (%s)", rec.peer_id, exc)
                self.failed[rec.peer_id] = self._now()
                continue
            pieces, offset = [], 0
            for state, n, c in zip(states, call.lens, replay):
                total = c.lens[0]
                pieces.append(y[offset + total - n : offset + total])  # only this step's rows
                offset += total
                self.close_session(state)
                state.peer, state.session = rec.peer_id, c.sessions[0]
            self.failovers += 1
            log.warning("mesh: layers %d:%d moved to %s in %.2fs", seg.start, seg.end, rec.peer_id,
                        time.monotonic() - t0)
            return torch.cat(pieces)

    def _now(self) -> float:
        from hivemind.utils.timed_storage import get_dht_time

        return get_dht_time()

    def close_session(self, state: _Remote) -> None:
        self.node.spawn(remote.close(self.node, PeerID.from_base58(state.peer), [state.session]))
