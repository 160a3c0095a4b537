"""How the soak's load generator (moemesh.benchkit.soak) classifies streamed answers, against a
canned loopback server: a token that reads "error" is not an error event (the cause of the
30-minute soak's 8 "unexplained" stream errors), a real error event is, and every unexplained
outcome keeps what was seen."""
from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moemesh.benchkit.soak import Soak, SoakConfig
from moemesh.benchkit.soak_report import SoakReport


def openai_chunk(delta: dict) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}


def sse(data: object, event: str | None = None) -> bytes:
    return ((f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n").encode()


ANSWERS: dict[str, tuple[int, bytes]] = {
    # a model that writes the token "error": a success in both shapes
    "openai_token_error": (200, sse(openai_chunk({"role": "assistant", "content": ""}))
                           + sse(openai_chunk({"content": "error"})) + b"data: [DONE]\n\n"),
    "anthropic_token_error": (200, sse({"type": "message_start", "message": {}}, "message_start")
                              + sse({"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "error"}}, "content_block_delta")
                              + sse({"type": "message_stop"}, "message_stop")),
    # the server's own error events (server/openai/chat.py, server/anthropic/messages.py)
    "openai_error_event": (200, sse(openai_chunk({"content": "a"}))
                           + sse({"error": {"message": "generation failed: boom", "type": "server_error"}})
                           + b"data: [DONE]\n\n"),
    "anthropic_error_event": (200, sse({"type": "message_start", "message": {}}, "message_start")
                              + sse({"type": "error", "error": {"type": "api_error", "message": "boom"}}, "error")),
    "openai_truncated": (200, sse(openai_chunk({"content": "half"}))),
    "http_500": (500, b'{"error": {"message": "boom"}}'),
}


class Canned(BaseHTTPRequestHandler):
    answer = "openai_token_error"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = ANSWERS[type(self).answer]
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
        self.end_headers()  # HTTP/1.0 without a length: the body ends when the connection closes
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def ask(httpd: ThreadingHTTPServer, answer: str, kind: str):
    Canned.answer = answer
    soak = Soak("127.0.0.1", httpd.server_address[1], 0, 4096, SoakConfig(timeout=10.0))
    return soak._request(kind, random.Random(0))


@pytest.mark.parametrize("answer, kind", [("openai_token_error", "chat_stream"),
                                          ("anthropic_token_error", "anthropic_stream")])
def test_a_token_reading_error_is_a_success(server, answer, kind):
    outcome = ask(server, answer, kind)
    assert outcome.category == "ok", outcome
    assert outcome.detail == ""


@pytest.mark.parametrize("answer, kind, category, seen", [
    ("openai_error_event", "chat_stream", "server_error", "generation failed: boom"),
    ("anthropic_error_event", "anthropic_stream", "server_error", '"type": "error"'),
    ("openai_truncated", "chat_stream", "truncated", "half"),
    ("http_500", "chat_stream", "server_error", '{"error": {"message": "boom"}}'),
])
def test_unexplained_outcomes_keep_what_was_seen(server, answer, kind, category, seen):
    outcome = ask(server, answer, kind)
    assert outcome.category == category and seen in outcome.detail, outcome
    report = SoakReport(outcomes=[outcome], seconds=1.0)
    summary = report.summary(warmup=0.0)
    assert summary["unexplained"] == 1
    assert summary["unexplained_details"] == [{"kind": kind, "category": category, "status": outcome.status,
                                               "detail": outcome.detail}]
