"""The HTTP/1.1 connection layer: uvicorn's h11 protocol with deadlines, so slow or hostile
clients cannot hold the server.

uvicorn times out idle keep-alive connections only: a connection that never finishes its headers,
or a body shorter than its Content-Length, is waited for forever, and an oversized header is
answered by closing the socket with the client's bytes unread (the client sees a reset, not the
error). Here each connection has one deadline at a time:

- header: from the connection (or the first byte of a next request) to the end of the headers;
  past it the client gets 408 (or a silent close if it sent nothing);
- body: from the end of the headers to the end of the body; past it 408 (or a close if the
  answer was already sent, e.g. a 413 whose unread body was being discarded);
- more than ``max_connections`` open connections: 503 and close; a head over ``max_header_bytes``:
  431.

Our own error answers are written raw (h11 cannot answer a request it never parsed) with the
OpenAI error body, and the connection is closed gracefully: write, half-close, and discard
what the client still sends for a moment, so it reads the answer instead of a reset.
"""
from __future__ import annotations

import asyncio
import http
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError
from .limits import ConnectionLimits

LINGER_SECONDS = 5.0  # after an error answer: how long to discard what the client still sends
LINGER_BYTES = 16 << 20


class _RecordingConnection(h11.Connection):
    """An h11 connection that remembers the last protocol error (uvicorn drops its status hint)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


def raw_error(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error response with the OpenAI error body, ``Connection: close``."""
    body = json.dumps(APIError(status, message, code=code).openai_body(), ensure_ascii=True).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _GracefulTransport:
    """The connection's transport as uvicorn sees it, but whose close() does not drop request bytes
    still on their way (an early answer such as a 413 to a client that said ``Connection: close``):
    closing with unread input resets the connection, and the client never reads the answer."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._protocol.conn.their_state is h11.SEND_BODY and not self._transport.is_closing():
            self._protocol.linger()
        else:
            self._transport.close()


class GuardedH11Protocol(H11Protocol):
    """Set ``limits`` on a subclass (``guarded_protocol``): uvicorn builds protocols itself."""

    limits: ConnectionLimits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _RecordingConnection(h11.SERVER, self.limits.max_header_bytes)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind: str | None = None  # idle | header | body | linger
        self._request_bytes = False  # bytes of the current request head arrived
        self._lingering = False
        self._linger_bytes = 0

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_GracefulTransport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._answer_and_close(503, f"the server has {self.limits.max_connections} connections open "
                                   "(its limit); retry later", "too_many_connections", {"retry-after": "1"})
            return
        self._arm("header", self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                self._raw.close()
            return
        if self.conn.their_state is h11.IDLE:
            self._request_bytes = True
        super().data_received(data)
        self._follow_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._lingering:
            self._follow_state()

    # -- uvicorn hooks ---------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: 431 for an oversized head, else 400 naming the problem."""
        err = self.conn.last_error
        status = getattr(err, "error_status_hint", 400) or 400
        if status == 431:
            message = f"the request line and headers are over {self.limits.max_header_bytes} bytes"
        else:
            message = f"malformed HTTP request: {err or msg}"
        self._answer_and_close(status, message, "bad_http_request" if status == 400 else "headers_too_large")

    # -- deadlines -------------------------------------------------------------------------------
    def _follow_state(self) -> None:
        """The deadline that the request's h11 state calls for (kept if already running)."""
        state = self.conn.their_state
        if state is h11.IDLE:  # between requests: idle (keep-alive) until a byte of the next one
            if self._request_bytes:
                self._arm("header", self.limits.header_timeout)
            else:
                self._arm("idle", self.limits.keep_alive)
            return
        self._request_bytes = False  # the head is complete
        if state is h11.SEND_BODY:
            self._arm("body", self.limits.body_timeout)
        else:  # DONE, MUST_CLOSE, CLOSED, ERROR: nothing to wait for (the answer may stream for long)
            self._disarm()

    def _arm(self, kind: str, seconds: float) -> None:
        if self._deadline_kind == kind:
            return  # a deadline runs from its start, not from the last byte
        self._disarm()
        self._deadline_kind = kind
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._deadline_kind = None, None

    def _expired(self) -> None:
        kind, self._deadline, self._deadline_kind = self._deadline_kind, None, None
        if self.transport.is_closing():
            return
        if kind == "idle" or (kind == "header" and not self._request_bytes):
            self._raw.close()  # an idle connection that is not sending a request
            return
        if kind == "header":
            self._answer_and_close(408, f"the request headers did not arrive within {self.limits.header_timeout:g} "
                                   "seconds", "request_timeout")
        elif kind == "body":
            cycle = self.cycle
            if cycle is None or cycle.response_started:
                self._raw.close()  # answered already (its body was being discarded)
                return
            cycle.disconnected = True  # the app reads a disconnect and sends nothing more
            cycle.message_event.set()
            self._answer_and_close(408, f"the request body did not arrive within {self.limits.body_timeout:g} "
                                   "seconds of its headers", "request_timeout")

    def _answer_and_close(self, status: int, message: str, code: str,
                          headers: dict[str, str] | None = None) -> None:
        """Write an error answer, then close gracefully."""
        self._raw.write(raw_error(status, message, code, headers))
        self.linger()

    def linger(self) -> None:
        """Close gracefully: half-close, then discard what the client still sends for a while (it
        reads the answer, not a reset), then close. Idempotent."""
        if self._lingering:
            return
        self._disarm()
        self._unset_keepalive_if_required()
        self._lingering = True
        self.connections.discard(self)  # closing: it no longer counts against max_connections
        try:
            if self._raw.can_write_eof():
                self._raw.write_eof()
        except (OSError, RuntimeError):
            self._raw.close()
            return
        self.flow.resume_reading()
        self._deadline_kind = "linger"
        self._deadline = self.loop.call_later(LINGER_SECONDS, self._raw.close)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def http_server(app: Any, limits: ConnectionLimits, log_level: str = "warning",
                access_log: bool = False) -> uvicorn.Server:
    """The uvicorn server for ``app`` under ``limits``; ``.run(sockets=[sock])`` serves until stopped."""
    config = uvicorn.Config(app, http=guarded_protocol(limits), log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=3, timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]
                            h11_max_incomplete_event_size=limits.max_header_bytes)
    return uvicorn.Server(config)
