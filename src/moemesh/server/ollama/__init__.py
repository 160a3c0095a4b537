"""Ollama's API on the same port: schemas (request bodies), convert (messages, tools, options,
model names -> the internal shapes), shapes (answers, for the OpenAPI document), generate
(/api/chat and /api/generate, streamed as NDJSON or whole), info (/api/tags, /api/show, /api/ps,
/api/version). Errors are Ollama's ``{"error": "..."}`` (common/errors)."""
