"""Regression tests of a hostile probe of ``moemesh serve smollm2`` (issue 20): each defect it found,
on the wire. Bad input is a 4xx naming the field (never a 500), big or slow clients cannot freeze
or hold the server, unknown model names are 404, and the server answers /health throughout."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from test_server_openai import FRANCE, KEY, LIMITS_CONNECTIONS, LIMITS_TIMEOUT, post, shared_server


@pytest.fixture(scope="module")
def server(request):
    return shared_server(request.config, "main")  # --api-key KEY, context 8192


@pytest.fixture(scope="module")
def limits(request):
    return shared_server(request.config, "limits")  # 1 s read timeouts, 16 connections, aliases smollm2 gpt-4o


def chat(server, **fields) -> tuple[int, dict]:
    return post(server, "/v1/chat/completions", json.dumps({"messages": FRANCE, "max_tokens": 2, **fields}).encode())


def health_seconds(server) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"{server.base_url}/health", timeout=30) as resp:
        assert resp.status == 200
    return time.perf_counter() - t0


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def status_and_body(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


# -- bad fields: 400 naming the field, on every endpoint -----------------------------------------
SURROGATE = '"\\ud800"'  # JSON text of a lone surrogate: valid JSON, not valid Unicode


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
     "messages[0].content"),
    ("/v1/completions", '{"prompt": %s}', "prompt"),
    ("/tokenize", '{"prompt": %s}', "prompt"),
    ("/v1/messages", '{"max_tokens": 2, "messages": [{"role": "user", "content": %s}]}', None),
    ("/v1/messages/count_tokens", '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
     None),
])
def test_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    status, reply = post(server, path, (body % SURROGATE).encode())
    assert status == 400, reply
    if path.startswith("/v1/messages"):
        assert reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error"
        assert "messages[0].content" in reply["error"]["message"] and "surrogate" in reply["error"]["message"]
    else:
        assert reply["error"]["param"] == param and "surrogate" in reply["error"]["message"]


@pytest.mark.parametrize("fields, param", [
    ({"top_k": 2**70}, "top_k"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 1001}]}, "messages[0].content"),
    ({"messages": FRANCE * 10_001}, "messages"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"n": 3}, "n"), ({"max_tokens": -1}, "max_tokens"),
])
def test_limits_and_ranges_are_400_naming_the_field(server, fields, param):
    status, reply = chat(server, **fields)
    assert status == 400 and reply["error"]["param"] == param, reply


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_numbers_are_refused(server, literal):
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": ' + literal + "}"
    status, reply = post(server, "/v1/chat/completions", body.encode())
    assert status == 400 and reply["error"]["param"] == "temperature" and "finite" in reply["error"]["message"]


def test_empty_or_non_object_body_says_what_is_missing(server):
    status, reply = post(server, "/v1/chat/completions", b"")
    assert status == 400 and "no body" in reply["error"]["message"] and "None" not in reply["error"]["message"]
    status, reply = post(server, "/v1/chat/completions", b"[]")
    assert status == 400 and "JSON object" in reply["error"]["message"] and "array" in reply["error"]["message"]
    status, reply = post(server, "/v1/chat/completions", b"{}")
    assert status == 400 and reply["error"]["param"] == "messages" and "missing" in reply["error"]["message"]


# -- model names ----------------------------------------------------------------------------------
def test_unknown_model_is_404_model_not_found(server, limits):
    status, reply = chat(server, model="gpt-4o")
    assert status == 404 and reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"
    status, reply = post(server, "/v1/messages", json.dumps(
        {"model": "claude-x", "max_tokens": 2, "messages": FRANCE}).encode())
    assert status == 404 and reply["error"]["type"] == "not_found_error"
    for path in ("/v1/completions", "/tokenize"):
        assert post(server, path, json.dumps({"model": "nope", "prompt": "hi"}).encode())[0] == 404
    assert chat(server, model="smollm2")[0] == 200
    assert chat(server)[0] == 200  # no name: the one model served
    # --served-model-name smollm2 gpt-4o: the first is reported, the others are accepted too
    assert chat(limits, model="gpt-4o")[1]["model"] == "smollm2"
    assert [m["id"] for m in limits.get_json("/v1/models")["data"]] == ["smollm2", "gpt-4o"]
    assert chat(limits, model="gpt-5")[0] == 404


# -- big bodies: refused before parsing; big prompts: checked cheaply, tokenized off the loop -----
def test_body_over_the_limit_is_413_before_it_is_read(server):
    size = 50_000_000  # the probe's 50 MB body: refused from its Content-Length alone
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {size}\r\n\r\n").encode()
    # the 413 comes back (and the connection closes) without the rest of the body being sent; read until
    # the close: head and body may arrive in separate packets
    status, reply = status_and_body(raw_exchange(server.port, head + b'{"messages": '))
    assert status == 413 and reply["error"]["code"] == "request_too_large" and "4194304" in reply["error"]["message"]
    # a chunked body (no Content-Length) is counted as it arrives
    chunk = b"x" * 1_000_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    status, reply = status_and_body(raw_exchange(server.port, (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + body))
    assert status == 413
    status, reply = post(server, "/v1/messages", b" " * 5_000_000)
    assert status == 413 and reply["error"]["type"] == "request_too_large"  # Anthropic's shape
    assert health_seconds(server) < 5


def test_prompt_longer_than_any_tokenization_is_refused_before_tokenizing(server):
    t0 = time.perf_counter()
    status, reply = chat(server, messages=[{"role": "user", "content": "a" * 3_000_000}])
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert "characters" in reply["error"]["message"] and time.perf_counter() - t0 < 5


def test_a_long_prompt_is_tokenized_while_health_keeps_answering(server):
    # ~110k tokens: fits the cheap check (8192 tokens x the longest token's 81 characters), so it is
    # templated and tokenized (seconds here) before the exact check refuses it
    result: dict = {}

    def big() -> None:
        t0 = time.perf_counter()
        result["status"], result["reply"] = chat(server, messages=[{"role": "user", "content": "hello world " * 55_000}])
        result["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=big)
    thread.start()
    waits = []
    while thread.is_alive():
        waits.append(health_seconds(server))
        time.sleep(0.02)
    thread.join()
    assert result["status"] == 400 and result["reply"]["error"]["code"] == "context_length_exceeded"
    assert "110031 tokens" in result["reply"]["error"]["message"]
    # the event loop never waited for the whole prompt (it used to: /health stalled for all of it)
    assert len(waits) >= 2 and max(waits) < max(0.25, result["seconds"] / 2), (waits, result["seconds"])


# -- slow and oversized clients (the "limits" server: 1 s header and body timeouts) ---------------
def test_slow_headers_and_short_bodies_get_408(limits):
    t0 = time.perf_counter()
    status, reply = status_and_body(raw_exchange(limits.port, b"GET /health HTTP/1.1\r\nHost: x\r\n"))
    assert status == 408 and reply["error"]["code"] == "request_timeout"
    assert LIMITS_TIMEOUT <= time.perf_counter() - t0 < LIMITS_TIMEOUT + 4
    status, reply = status_and_body(raw_exchange(limits.port, (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{\"messages\": ")))  # 87 bytes short, forever
    assert status == 408 and "body" in reply["error"]["message"]
    t0 = time.perf_counter()
    assert raw_exchange(limits.port, b"") == b""  # a connection that never sends is closed, silently
    assert time.perf_counter() - t0 < LIMITS_TIMEOUT + 4


def test_oversized_header_gets_431_not_a_reset(limits):
    reply = raw_exchange(limits.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    status, body = status_and_body(reply)
    assert status == 431 and body["error"]["code"] == "headers_too_large"


def test_many_slow_connections_are_capped_and_released(limits):
    socks = []
    try:
        for _ in range(4 * LIMITS_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", limits.port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            socks.append(sock)
        time.sleep(LIMITS_TIMEOUT + 1.5)
        answers = []
        for sock in socks:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            answers.append(status_and_body(data)[0])
    finally:
        for sock in socks:
            sock.close()
    # past the cap: 503 at once; within it: held only until the header timeout, then 408
    assert answers.count(503) >= 2 * LIMITS_CONNECTIONS and set(answers) == {408, 503}, answers
    assert health_seconds(limits) < 5


# -- API keys --------------------------------------------------------------------------------------
def test_api_key_is_compared_in_constant_time_as_bytes(monkeypatch):
    import asyncio
    import hmac

    from moemesh.server.common import auth

    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def status(header: bytes) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", b"Bearer " + header)]}
        asyncio.run(auth.ApiKeyMiddleware(app, api_key="clé-secrète")(scope, receive, send))
        return sent[0]["status"]

    assert status("clé-secrète".encode()) == 200  # a non-ASCII key, sent as UTF-8 bytes
    assert status(b"cle-secrete") == 401 and status(b"") == 401
    assert compared and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in compared)
