"""The API node's per-peer mesh metrics in Prometheus text: calls (unary expert calls and chained
steps, counted at the peer that answered), their wall seconds, link messages and serialized bytes
each way, the last ping round trip, and the steps replayed on a new plan."""
from __future__ import annotations

from .transport.stats import CallStats

METRICS = [  # (name, PeerStats field, type, help)
    ("moemesh_mesh_peer_calls_total", "calls", "counter", "Calls answered by the peer (expert calls, chained steps)."),
    ("moemesh_mesh_peer_call_seconds_total", "call_seconds", "counter", "Wall seconds of those calls."),
    ("moemesh_mesh_peer_messages_sent_total", "messages_sent", "counter", "Link messages sent to the peer."),
    ("moemesh_mesh_peer_messages_received_total", "messages_received", "counter", "Link messages from the peer."),
    ("moemesh_mesh_peer_bytes_sent_total", "bytes_sent", "counter", "Serialized bytes sent to the peer."),
    ("moemesh_mesh_peer_bytes_received_total", "bytes_received", "counter", "Serialized bytes received from it."),
    ("moemesh_mesh_peer_rtt_seconds", "rtt_s", "gauge", "Last ping round trip to the peer."),
]


def render(stats: CallStats, labels: str, failovers: int) -> str:
    out = []
    peers = sorted(stats.peers.items())
    for name, attr, kind, help_text in METRICS:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for peer, p in peers:
            value = getattr(p, attr)
            if value is not None:
                out.append(f'{name}{{{labels},peer="{peer}"}} {value}')
    out += ["# HELP moemesh_mesh_failovers_total Steps replayed on a new plan after a node failed.",
            "# TYPE moemesh_mesh_failovers_total counter", f"moemesh_mesh_failovers_total{{{labels}}} {failovers}"]
    return "\n".join(out) + "\n"
