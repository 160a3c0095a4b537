"""The OpenAI-compatible API of a live ``moemesh serve smollm2`` on loopback, driven by the real
``openai`` SDK (and raw HTTP where the SDK would hide what is on the wire)."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from moemesh.server.launcher import ServerProcess

KEY = "test-key"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


# Server configurations of the whole server test suite. One thread each: this machine's two cores
# are shared, and an oversubscribed OpenMP pool stalls. "main" uses the default prefill chunk (512
# rows): the int kernels are row-invariant, so a sequence's output does not depend on what it is
# batched with (the eight-streams test). "limits" is tiny on purpose, with short read timeouts and
# few connections (test_server_hardening), and answers to the name "gpt-4o" too (the migration snippet).
LIMITS_CTX = 128
LIMITS_TIMEOUT = 1.0
LIMITS_CONNECTIONS = 16
SERVERS = {
    "main": ("smollm2", "--api-key", KEY, "--threads", "1"),
    "limits": ("smollm2", "--queue-size", "1", "--max-batch", "1", "--ctx", str(LIMITS_CTX), "--threads", "1",
               "--served-model-name", "smollm2", "gpt-4o", "--header-timeout", str(LIMITS_TIMEOUT),
               "--body-timeout", str(LIMITS_TIMEOUT), "--max-connections", str(LIMITS_CONNECTIONS)),
}
_RUNNING = pytest.StashKey[dict]()


def shared_server(config: pytest.Config, name: str) -> ServerProcess:
    """The named server, one process for the whole session. The first call launches them all so
    they load side by side, and waits until each answers /health (503 while it loads)."""
    running = config.stash.get(_RUNNING, None)
    if running is None:
        running = config.stash[_RUNNING] = {n: ServerProcess(*args).launch() for n, args in SERVERS.items()}
        for srv in running.values():
            config.add_cleanup(srv.stop)
        for srv in running.values():
            srv.wait_listening()
    return running[name].wait_ready()


@pytest.fixture(scope="module")
def server(request):
    return shared_server(request.config, "main")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(server, name: str) -> float:
    for line in server.get_text("/metrics").splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_idle(server, timeout: float = 5.0) -> float:
    """Seconds until no request is running or waiting (fails after timeout)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:num_requests_waiting") == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"requests still running after {timeout}s")


def post(server, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(server.base_url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_plain_chat(client):
    r = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert r.model == "smollm2" and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens >= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_plain_with_usage(client):
    plain = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_stop_string_is_cut_and_not_returned(client):
    for stream in (False, True):
        r = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, stop=[" Paris"],
                                           stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
        assert text == "The capital of France is"


def test_token_limits_logprobs_and_seeds(client):
    r = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_completion_tokens=3,
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    lps = r.choices[0].logprobs.content
    assert len(lps) == 3 and "".join(lp.token for lp in lps) == r.choices[0].message.content
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token for lp in lps)  # greedy
    sampled = [client.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=1.0, top_p=0.95, seed=7, max_tokens=12, presence_penalty=0.5,
        frequency_penalty=0.3, extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    ).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0]


def test_named_tool_choice_forces_a_call(client):
    r = client.chat.completions.create(model="smollm2", messages=WEATHER_Q, tools=[WEATHER_TOOL, TIME_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_required_tool_call_streams_in_openai_shape(client):
    args = dict(model="smollm2", messages=WEATHER_Q, tools=[WEATHER_TOOL], tool_choice="required", temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**args, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in deltas[1:])
    assert len(deltas) > 2  # arguments arrive in fragments
    arguments = "".join(d.function.arguments for d in deltas)
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_hides_tools_and_history_round_trips(client):
    plain = client.chat.completions.create(model="smollm2", messages=WEATHER_Q, temperature=0, max_tokens=8)
    none = client.chat.completions.create(model="smollm2", messages=WEATHER_Q, tools=[WEATHER_TOOL],
                                          tool_choice="none", temperature=0, max_tokens=8)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens and not none.choices[0].message.tool_calls
    history = WEATHER_Q + [
        {"role": "assistant", "content": None, "reasoning_content": "The user wants weather; call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER_TOOL], temperature=0,
                                       max_tokens=24)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens and r.choices[0].message.content


def test_completions_models_tokenize(client, server):
    args = dict(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    whole = client.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens == 5
    assert client.completions.create(**args, echo=True).choices[0].text == "The capital of France is" + streamed
    status, tok = post(server, "/tokenize", json.dumps({"prompt": "The capital of France is"}).encode())
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
    by_ids = client.completions.create(**{**args, "prompt": tok["tokens"]})
    assert by_ids.choices[0].text == whole.choices[0].text
    status, detok = post(server, "/detokenize", json.dumps({"tokens": tok["tokens"]}).encode())
    assert status == 200 and detok["prompt"] == "The capital of France is"
    assert [m.id for m in client.models.list().data] == ["smollm2"]


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"), ({"temperature": "hot"}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"tool_choice": "required"}, "tool_choice"), ({"seed": 2**70}, "seed"),
])
def test_bad_fields_are_400_naming_the_field(client, extra, param):
    body = {"model": "smollm2", "messages": FRANCE, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_malformed_json_oversize_prompt_and_auth(server, client):
    status, body = post(server, "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hello " * 9000}])
    assert e.value.body["code"] == "context_length_exceeded" and "8192" in e.value.body["message"]
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="smollm2", messages=FRANCE)
    status, body = post(server, "/v1/chat/completions", json.dumps({"messages": FRANCE}).encode(), key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server.get_json("/health")["status"] == "ok"  # open without a key


def test_eight_concurrent_streams_equal_each_alone(server, client):
    topics = ["the sea", "a cat", "Paris", "robots", "winter", "coffee", "a lighthouse", "the moon"]
    asks = [[{"role": "user", "content": f"Write one sentence about {t}."}] for t in topics]
    alone = [client.chat.completions.create(model="smollm2", messages=m, temperature=0, max_tokens=10)
             .choices[0].message.content for m in asks]

    def stream(messages: list[dict]) -> str:
        chunks = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=10,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, asks))
    assert together == alone
    wait_idle(server)


def test_client_disconnect_stops_generation(server, client):
    before = metric(server, 'vllm:request_success_total{model_name="smollm2",finished_reason="abort"}')
    stream = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=4000, stream=True,
                                            extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert metric(server, "vllm:num_requests_running") == 1
    stream.close()
    assert wait_idle(server, timeout=3.0) < 3.0
    # a non-streamed request whose client hangs up is stopped too
    body = json.dumps({"messages": FRANCE, "max_tokens": 4000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    assert wait_idle(server, timeout=3.0) < 3.0
    after = metric(server, 'vllm:request_success_total{model_name="smollm2",finished_reason="abort"}')
    assert after == before + 2


def test_metrics_after_traffic(server):
    text = server.get_text("/metrics")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                 "moemesh_expert_providers"):
        assert name in text
    assert metric(server, "vllm:generation_tokens_total") > 0
    assert metric(server, "vllm:time_to_first_token_seconds_count") > 0
    assert metric(server, "moemesh_expert_providers") == 0  # SmolLM2 is dense: no ExpertProvider
