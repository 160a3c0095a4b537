"""Anthropic's Messages API: schemas (request bodies), responses (answer shapes, for the OpenAPI
document), convert (Anthropic messages -> the internal chat shape), messages (/v1/messages,
/v1/messages/count_tokens)."""
