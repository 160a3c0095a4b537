"""Discovery: how a node finds a mesh to join.

``invite`` (name + secret + addresses in one string), ``nostr_keys``, ``nostr_listing``,
``nostr_relays``, ``nostr_publisher`` (kind-31990 listings on Nostr relays), ``join`` (fetch and
rank listings, ``auto_join``), ``node_state`` (the running node's invite for ``mesh invite``).
Needs no P2P transport: it only produces invites.
"""
