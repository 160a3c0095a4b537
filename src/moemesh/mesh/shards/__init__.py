"""Expert shards: every node holds every layer's trunk but only some experts.

``assign`` (``--experts`` parsing and ``auto`` assignment), ``expert_server`` (serve held
experts through the local provider), ``remote_experts`` (RemoteExperts: the provider that sends
rows to the holders, batched per peer per layer, exact on an fp32 wire), ``masked`` (routers
limited to one shard's experts: no traffic, approximate).
"""
