"""Pipeline stages: a model split by layer ranges.

``slice`` (load layers A:B, plus the ends on an API node), ``stage`` (StageServer: serve them,
one KV session per caller and request), ``route`` (which live node serves which range),
``remote`` (the client side of a stage call), ``model`` (PipelineModel: the API node's model,
with failover by replay).
"""
