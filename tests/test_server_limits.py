"""Protection of a live server: 503 while loading, 429 past --queue-size (with Retry-After), the
context window (400, never truncated), and clear exits for a bad model or a busy port."""
from __future__ import annotations

import socket
import threading
import time

import openai
import pytest

from moemesh.cli import main
from test_server_openai import LIMITS_CTX as CTX
from test_server_openai import shared_server

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(request):
    return shared_server(request.config, "limits")  # --queue-size 1, --ctx 128, no --api-key


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def metric(server, name: str) -> float:
    for line in server.get_text("/metrics").splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_is_503_until_the_model_is_loaded(server):
    # the HTTP server starts before the model loads: its first /health answer came while loading
    assert server.health_codes[0] == 503 and server.health_codes[-1] == 200
    assert set(server.health_codes) == {503, 200}


def test_queue_full_is_429_with_retry_after(server, client):
    stream = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=80, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(stream))  # admitted and generating
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=4)
    assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
    assert metric(server, "moemesh_requests_rejected_total") >= 1
    stream.close()  # leaving frees the slot
    deadline = time.monotonic() + 5
    while metric(server, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0,
                                          max_tokens=8).choices[0].message.content


def test_queue_admits_again_after_concurrent_burst(client):
    results: list[str] = []

    def ask() -> None:
        try:
            client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=16)
            results.append("ok")
        except openai.RateLimitError:
            results.append("429")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "ok" in results and "429" in results  # one at a time fits, the rest are turned away


def test_context_window_is_never_truncated(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "word " * 300}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    r = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=1000,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == CTX


def test_migration_snippet_runs_unchanged(server):
    # --ctx 128 bounds this sampled (temperature 0.4, unseeded) answer's length, so the test stays fast
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="anything")
    response = client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "You are a senior data analyst."},
            {"role": "user", "content": "Summarize this Q3 financial data."},
        ],
        temperature=0.4,
        max_tokens=1024,
    )
    print(response.choices[0].message.content)
    assert response.choices[0].message.content.strip()


def test_serve_exits_clearly_on_bad_model_or_busy_port(tmp_path, capsys):
    # in process: the command returns its exit status instead of raising
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "no such file" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", "smollm2", "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
