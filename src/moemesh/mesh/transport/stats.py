"""What a node's calls and links cost, in total and per peer (``mesh status``, the API node's /metrics)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PeerStats:
    """One peer: calls and link messages to it, their wall time, bytes each way, the last ping."""

    calls: int = 0
    call_seconds: float = 0.0  # wall time of unary calls and of chained steps that ended at this peer
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rtt_s: float | None = None  # last ping round trip (seconds)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CallStats:
    """Calls made: wall time vs the callee's reported compute time (the rest is transport), and the
    serialized bytes of every message (header + tensors; handshakes included), per peer too."""

    calls: int = 0
    wall_s: float = 0.0
    remote_compute_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    peers: dict[str, PeerStats] = field(default_factory=dict)

    def add(self, wall: float, compute: float, peer: str | None = None) -> None:
        self.calls, self.wall_s, self.remote_compute_s = self.calls + 1, self.wall_s + wall, self.remote_compute_s + compute
        if peer is not None:
            p = self.peer(peer)
            p.calls, p.call_seconds = p.calls + 1, p.call_seconds + wall

    def peer(self, peer: str) -> PeerStats:
        return self.peers.setdefault(peer, PeerStats())

    def sent(self, peer: str, nbytes: int, message: bool = False) -> None:
        self.bytes_sent += nbytes
        p = self.peer(peer)
        p.bytes_sent += nbytes
        p.messages_sent += int(message)

    def received(self, peer: str, nbytes: int, message: bool = False) -> None:
        self.bytes_received += nbytes
        p = self.peer(peer)
        p.bytes_received += nbytes
        p.messages_received += int(message)
