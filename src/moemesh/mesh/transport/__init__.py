"""Transport: how mesh nodes reach each other.

``node`` (MeshNode: one hivemind P2P daemon + DHT node on a private asyncio loop; every call
proven, timed and checked), ``wire`` (msgpack header + raw tensor bytes, under the 4 MiB cap),
``auth`` (mesh-secret HMAC handshake, peer-id allowlist), ``membership`` (signed DHT node records
with heartbeat). Knows nothing of models.
"""
