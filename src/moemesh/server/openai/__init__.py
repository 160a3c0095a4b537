"""OpenAI's API surface: schemas (request bodies), responses (answer shapes, for the OpenAPI
document), chat (/v1/chat/completions), completions (/v1/completions), models (/v1/models),
tokenize (vLLM's /tokenize and /detokenize)."""
