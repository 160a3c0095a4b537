"""The Anthropic Messages API of a live ``moemesh serve smollm2``, driven by the real ``anthropic``
SDK (which sends x-api-key and anthropic-version itself). This SDK version no longer takes
temperature as an argument, so greedy decoding is asked for through extra_body."""
from __future__ import annotations

import anthropic
import pytest

from test_server_openai import KEY, shared_server

GREEDY = {"temperature": 0}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"name": "get_weather", "description": "Get the current weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_Q = [{"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]}]


@pytest.fixture(scope="module")
def server(request):
    return shared_server(request.config, "main")  # the OpenAI tests' server: one load for both


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


def test_message_plain_and_streamed(client):
    m = client.messages.create(model="smollm2", max_tokens=64, messages=FRANCE, extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.stop_reason == "end_turn"
    (block,) = m.content
    assert block.type == "text" and "Paris" in block.text
    assert m.usage.input_tokens > 10 and m.usage.output_tokens >= 5
    with client.messages.stream(model="smollm2", max_tokens=64, messages=FRANCE, extra_body=GREEDY) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds and "message_delta" in kinds
    assert final.content[0].text == block.text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == m.usage.output_tokens


def test_system_stop_sequences_and_max_tokens(client):
    m = client.messages.create(model="smollm2", max_tokens=64, messages=FRANCE, stop_sequences=[" Paris"],
                               extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == " Paris"
    assert m.content[0].text == "The capital of France is"
    plain = client.messages.create(model="smollm2", max_tokens=2, messages=FRANCE, extra_body=GREEDY)
    system = client.messages.create(model="smollm2", max_tokens=2, messages=FRANCE, extra_body=GREEDY,
                                    system=[{"type": "text", "text": "You are a geography teacher."}])
    assert system.stop_reason == "max_tokens" and system.usage.output_tokens == 2
    assert system.usage.input_tokens != plain.usage.input_tokens  # the system prompt replaced the default


def test_forced_tool_use_plain_and_streamed(client):
    args = dict(model="smollm2", max_tokens=128, messages=WEATHER_Q, tools=[WEATHER_TOOL],
                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    m = client.messages.create(**args)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and isinstance(use.input, dict)
    with client.messages.stream(**args) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds  # arguments streamed as input_json_delta fragments
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == use.input and final.stop_reason == "tool_use"


def test_tool_result_and_thinking_in_history(client):
    history = WEATHER_Q + [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I need the weather tool.", "signature": "x"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C, sunny"}]}]},
    ]
    m = client.messages.create(model="smollm2", max_tokens=24, messages=history, tools=[WEATHER_TOOL],
                               extra_body=GREEDY)
    assert m.content and m.usage.input_tokens > 100
    count = client.messages.count_tokens(model="smollm2", messages=history, tools=[WEATHER_TOOL])
    assert count.input_tokens == m.usage.input_tokens


def test_errors_and_bearer_auth(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="smollm2", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.post("/v1/messages", body={"model": "smollm2", "messages": FRANCE}, cast_to=object)
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model="smollm2", max_tokens=8, messages=FRANCE)
    assert e.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=server.base_url, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model="smollm2", max_tokens=4, messages=FRANCE, extra_body=GREEDY).content
