"""Membership: each node announces what it serves as a signed DHT record with an expiration.

Key ``moemesh/<mesh>/nodes``, one subkey per peer id. A record lives ``3 * heartbeat`` seconds
and is re-stored every heartbeat, so a node that dies drops out of listings within that time
and a node that comes back reappears at its first heartbeat. Records carry an HMAC under the
mesh key (anyone on the DHT can write values): unsigned or mis-signed records are ignored.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import msgpack
from hivemind.utils.timed_storage import get_dht_time

from .auth import sign_record
from .node import MeshNode

log = logging.getLogger("moemesh.mesh")


@dataclass
class NodeRecord:
    peer_id: str  # base58
    model: str
    layers: tuple[int, int]  # [start, end)
    num_layers: int
    addrs: list[str] = field(default_factory=list)  # multiaddrs to dial
    experts: list[int] | None = None  # expert ids held (None: all)
    free_memory: int = 0  # bytes
    load: float = 0.0  # running sequences
    http: str | None = None  # http://host:port when it serves the API
    time: float = 0.0  # announce time (DHT clock)
    share: list[int] | None = None  # [start, end): the layer range it offers; None: any a plan gives it
    elastic: bool = False  # built every layer and can compute every expert: a plan may give it any share
    capacity: int = 0  # bytes of its expert cache (or of free memory): plans split work in proportion
    mode: str = "stages"  # "stages" (pipeline) or "experts" (expert shards)
    status: dict = field(default_factory=dict)  # what `mesh status` shows: budget, hit rate, tok/s, links

    def to_value(self, key: bytes) -> dict:
        payload = msgpack.packb(asdict(self) | {"layers": list(self.layers)})
        return {"record": payload, "mac": sign_record(key, payload)}

    @classmethod
    def from_value(cls, value: object, key: bytes) -> "NodeRecord | None":
        if not isinstance(value, dict) or not isinstance(value.get("record"), bytes):
            return None
        if not hmac.compare_digest(value.get("mac", b""), sign_record(key, value["record"])):
            return None
        try:
            d = msgpack.unpackb(value["record"], raw=False)
            d["layers"] = (int(d["layers"][0]), int(d["layers"][1]))
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})  # fields of newer versions ignored
        except Exception:
            return None


def nodes_key(mesh_name: str) -> str:
    return f"moemesh/{mesh_name}/nodes"


class Membership:
    """Announces this node's record every heartbeat; lists the live, correctly signed records."""

    def __init__(self, node: MeshNode, record: NodeRecord | None,
                 refresh: Callable[[NodeRecord], None] | None = None) -> None:
        self.node = node
        self.record = record  # None: a client that only reads the listing
        self.refresh = refresh  # updates load / free memory before each announcement
        self.key = nodes_key(node.options.mesh_name)
        self._task: asyncio.Task | None = None
        self.rejected = 0  # records of the last listing that failed the MAC check (another secret)

    async def announce(self) -> bool:
        assert self.node.dht is not None and self.record is not None
        if self.refresh is not None:
            self.refresh(self.record)
        self.record.time = get_dht_time()
        ttl = 3 * self.node.options.heartbeat
        return await self.node.dht.store(self.key, self.record.to_value(self.node.allowlist.key),
                                         get_dht_time() + ttl, subkey=self.record.peer_id)

    async def _beat(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.announce(), self.node.options.heartbeat * 2)
            except Exception as exc:  # keep beating: a transient DHT failure must not drop us
                log.warning("membership heartbeat failed: %s", exc)
            await asyncio.sleep(self.node.options.heartbeat)

    def start(self) -> None:
        """Announce at once, then every heartbeat (on the mesh loop)."""
        if self.record is None:
            return

        async def go() -> None:
            await self.announce()
            self._task = self.node.background(self._beat())

        self.node.run(go(), 30.0)

    async def live_nodes(self) -> list[NodeRecord]:
        assert self.node.dht is not None
        found = await self.node.dht.get(self.key, latest=True)
        records: list[NodeRecord] = []
        self.rejected = 0
        if found is None or not isinstance(found.value, dict):
            return records
        now = get_dht_time()
        for item in found.value.values():
            if item.expiration_time < now:
                continue
            rec = NodeRecord.from_value(item.value, self.node.allowlist.key)
            if rec is not None:
                records.append(rec)
            else:
                self.rejected += 1
        return sorted(records, key=lambda r: (r.layers, r.peer_id))
