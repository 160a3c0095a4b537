"""What one request and one connection may use: body size, read timeouts, list lengths.

Counts bound the work a request can ask for before the context check sees it (each message,
part and stop string costs Python time per request or per generated token); the body-size limit
bounds memory before anything is parsed. The connection limits (timeouts, header size, number of
connections) are enforced by the HTTP protocol (protocol.py).
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGES = 10_000  # each message costs template tokens: more never fits a context window anyway
MAX_CONTENT_PARTS = 1_000  # parts of one message (or Anthropic content blocks)
MAX_TOOLS = 512
MAX_STOP = 16  # OpenAI allows 4; StopMatcher costs O(count x length) per generated token
MAX_STOP_CHARS = 256
MAX_INT32 = 2**31 - 1  # top_k and friends: the engine keeps them in machine integers

MIN_BODY_BYTES = 4 << 20  # tool schemas and system prompts of agent clients fit many times over
BODY_BYTES_PER_TOKEN = 64  # JSON-escaped text (\\uXXXX per non-ASCII char) of one token, generously


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits of the HTTP server (``moemesh serve --max-body-bytes`` etc.)."""

    max_body_bytes: int | None = None  # None: sized from the context window (body_limit)
    header_timeout: float = 10.0  # seconds from the first byte (or the connection) to the end of the headers
    body_timeout: float = 60.0  # seconds from the end of the headers to the end of the body
    max_header_bytes: int = 64 << 10  # request line + headers; larger gets 431
    max_connections: int = 512  # open connections; more are answered 503 and closed
    keep_alive: float = 5.0  # idle seconds between requests on one connection

    def body_limit(self, context_length: int) -> int:
        """The request-body limit: the configured one, else room for a full-context prompt."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(MIN_BODY_BYTES, context_length * BODY_BYTES_PER_TOKEN)
