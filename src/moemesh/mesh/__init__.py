"""The mesh: several machines serve one model, every node with the same OpenAI API.

Subpackages, each importing only those below it (checked by import-linter, pyproject.toml):

- ``stack``, ``api``, ``launcher``: assemble one node from options; the server hook; child nodes.
- ``pipeline``: layer ranges (stages) served per session and the API node's PipelineModel.
- ``shards``: expert shards (which experts a node holds, serving them, the RemoteExperts provider,
  masked routing).
- ``transport``: the P2P node (hivemind daemon + DHT on a private loop, timed calls), the wire
  format, the mesh-secret handshake, signed membership records.
- ``discovery``: invites, Nostr listings and relays, auto-join, the node-state file.
"""
