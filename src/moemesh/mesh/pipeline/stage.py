"""StageServer: serves this node's layers to mesh members, one KV-cache session per request.

``moemesh.stage.forward``: header {sessions, lens, starts, wire}, tensors [x [T, D], positions [T]]
-> {rows}, [y [T, D]]. Rows of several sessions (sequences) come in one call, laid end to end
like the engine's BatchLayout. A session is created by its first call (start must be 0); later
calls must continue it exactly (start == tokens already cached), so a caller that lost track
gets a clear error and replays instead of silently corrupting the cache.
``moemesh.stage.close``: {sessions} frees them; sessions idle past ``session_ttl`` are freed too.

All torch work runs on one worker thread: the cache is not thread-safe and the mesh loop must
stay free to answer other calls (and heartbeats) while a stage computes.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from hivemind.p2p import P2PContext

from ...batch import BatchLayout
from ..transport.node import MeshNode
from ..transport.wire import DTYPES
from .slice import StageLayers

FORWARD = "moemesh.stage.forward"
CLOSE = "moemesh.stage.close"


@dataclass
class _Session:
    seq_id: int
    last_used: float


class StageServer:
    def __init__(self, node: MeshNode, stage: StageLayers, kv: str = "dense", session_ttl: float = 600.0) -> None:
        self.node, self.stage = node, stage
        self.cache = stage.new_cache(kv)
        self.session_ttl = session_ttl
        self.sessions: dict[tuple[bytes, str], _Session] = {}
        self._next_id = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="moemesh-stage")
        self.calls = 0
        self.rows = 0

    @property
    def load(self) -> int:
        return len(self.sessions)

    def start(self) -> None:
        async def register() -> None:
            await self.node.add_handler(FORWARD, self._on_forward)
            await self.node.add_handler(CLOSE, self._on_close)
            self.node.background(self._gc())

        self.node.run(register(), 30.0)

    async def _on_forward(self, header: dict, tensors: list, ctx: P2PContext) -> tuple[dict, list]:
        try:
            sessions, lens, starts = list(header["sessions"]), list(header["lens"]), list(header["starts"])
            wire = DTYPES[header.get("wire", "fp32")]
            x, positions = tensors
        except (KeyError, ValueError, TypeError) as exc:
            return {"error": f"bad forward request: {exc!r}"}, []
        if len(sessions) != len(lens) or len(lens) != len(starts) or x.dim() != 2 or x.shape[0] != sum(lens) \
                or positions.shape != (x.shape[0],) or x.shape[1] != self.stage.args.hidden_size:
            return {"error": "bad forward request: shapes disagree"}, []
        owner = ctx.remote_id.to_bytes()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            y = await loop.run_in_executor(self._worker, self._forward, owner, sessions, lens, starts, x, positions)
        except ValueError as exc:
            return {"error": str(exc)}, []
        self.calls += 1
        self.rows += int(x.shape[0])
        # compute time (queueing included) lets callers separate transport overhead from work
        return {"rows": int(y.shape[0]), "compute_s": time.perf_counter() - t0}, [y.to(wire)]

    def _forward(self, owner: bytes, sessions: list, lens: list, starts: list, x, positions) -> torch.Tensor:
        now = time.monotonic()
        seq_ids = []
        for sid, start in zip(sessions, starts):
            s = self.sessions.get((owner, sid))
            if s is None:
                if start != 0:
                    raise ValueError(f"unknown session {sid} (expired or this node restarted): replay from 0")
                s = self.sessions[(owner, sid)] = _Session(self._next_id, now)
                self._next_id += 1
                self.cache.add_sequence(s.seq_id)
            elif self.cache.length(s.seq_id) != start:
                raise ValueError(f"session {sid} out of sync: {self.cache.length(s.seq_id)} tokens cached, "
                                 f"call starts at {start}")
            s.last_used = now
            seq_ids.append(s.seq_id)
        with torch.inference_mode():
            return self.stage(x.float(), positions, self.cache, BatchLayout(seq_ids, lens))  # [T, D]

    async def _on_close(self, header: dict, tensors: list, ctx: P2PContext) -> tuple[dict, list]:
        owner = ctx.remote_id.to_bytes()
        keys = [(owner, sid) for sid in header.get("sessions", [])]
        await asyncio.get_running_loop().run_in_executor(self._worker, self._free, keys)
        return {"ok": True}, []

    def _free(self, keys: list[tuple[bytes, str]]) -> None:
        for key in keys:
            s = self.sessions.pop(key, None)
            if s is not None:
                self.cache.free_sequence(s.seq_id)

    async def _gc(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.session_ttl / 2))
            now = time.monotonic()
            idle = [k for k, s in list(self.sessions.items()) if now - s.last_used > self.session_ttl]
            if idle:
                await asyncio.get_running_loop().run_in_executor(self._worker, self._free, idle)
