"""A stand-in HTTP server that records what a client sends and answers from a list of canned
replies, so that a test can learn the exact request bodies an agent framework makes (its tool
schemas, its history) and fit a scripted checkpoint to them before the real server runs."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Recorder:
    """``with Recorder([reply, ...]) as rec:`` point the client at ``rec.base_url``; each POST gets
    the next reply (a dict: JSON; a str: a server-sent event stream), and ``rec.bodies`` holds the
    JSON bodies in order. With no reply left it answers 400 (which clients do not retry)."""

    def __init__(self, replies: list[dict[str, Any] | str]) -> None:
        self.replies = list(replies)
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                recorder.bodies.append(body)
                recorder.paths.append(self.path)
                reply = recorder.replies.pop(0) if recorder.replies else {"error": {"message": "no more replies"}}
                stream = isinstance(reply, str)
                data = reply.encode() if stream else json.dumps(reply).encode()
                self.send_response(200 if stream or "error" not in reply else 400)
                self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Recorder:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
