"""HTTP plumbing shared by every API surface: protocol (connection deadlines, 408/431/503, graceful
close), limits (sizes, counts, timeouts), body_limit (413 before parsing), auth (API key),
errors (OpenAI / Anthropic error bodies), schema_base (strict, finite, valid-Unicode request
bodies), openapi (the served document, true to what is sent). Imports nothing from core or the
API packages."""
