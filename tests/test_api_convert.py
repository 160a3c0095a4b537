"""The Responses API's and Ollama's requests -> the internal chat shape, and the Responses API's
event stream, without a server (the live clients are in test_server_clients.py)."""
from __future__ import annotations

import asyncio
import json

import pytest

from moemesh.server.common.errors import APIError
from moemesh.server.core.generation import Delta, Outcome
from moemesh.server.ollama import convert as oc
from moemesh.server.ollama.schemas import ChatRequest, GenerateRequest, Options
from moemesh.server.responses_api import convert as rc
from moemesh.server.responses_api.render import ResponseMeta, output_items, stream_response
from moemesh.server.responses_api.schemas import ResponsesRequest
from moemesh.tokenizer.formats.tool_parser import ToolCall, ToolCallDelta


def responses(**body) -> ResponsesRequest:
    return ResponsesRequest.model_validate(body)


def test_responses_input_items_become_chat_turns():
    body = responses(instructions="Be brief.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Use the tool."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
        {"role": "assistant", "content": "Sunny at noon."},
        {"role": "developer", "content": "Answer in French."},
    ])
    assert rc.chat_messages(body) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "assistant", "content": "Sunny at noon."},
        {"role": "developer", "content": "Answer in French."},
    ]


def test_responses_tools_match_the_chat_routes_shape():
    from moemesh.server.openai.schemas import ToolDef

    flat = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}
    nested = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    (tool,) = rc.chat_tools(responses(input="x", tools=[flat]))
    assert json.dumps(tool) == json.dumps(ToolDef.model_validate(nested).model_dump(exclude_none=True))
    assert rc.chat_tool_choice(responses(input="x", tool_choice={"type": "function", "name": "f"}).tool_choice) == {
        "name": "f"}


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "input_image"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
    ({"input": []}, "input"),
])
def test_responses_bad_input_names_the_field(body, param):
    with pytest.raises(APIError) as e:
        rc.chat_messages(responses(**body))
    assert e.value.status == 400 and e.value.param == param


def test_responses_other_tool_types_refused():
    with pytest.raises(APIError) as e:
        rc.chat_tools(responses(input="x", tools=[{"type": "file_search"}]))
    assert e.value.param == "tools[0].type" and "file_search" in e.value.message


def meta() -> ResponseMeta:
    return ResponseMeta("resp_1", 0, "m", {"instructions": None, "max_output_tokens": None, "temperature": 1.0,
                                           "top_p": 1.0, "parallel_tool_calls": True, "tools": [],
                                           "tool_choice": "auto", "text": {"format": {"type": "text"}},
                                           "truncation": "disabled", "metadata": {}})


class FakeGeneration:
    def __init__(self, deltas: list[Delta], outcome: Outcome) -> None:
        self._deltas, self.outcome = deltas, outcome

    async def deltas(self):
        for d in self._deltas:
            yield d


def events_of(deltas: list[Delta], outcome: Outcome) -> list[dict]:
    async def collect() -> list[str]:
        return [e async for e in stream_response(FakeGeneration(deltas, outcome), meta())]

    out = []
    for raw in asyncio.run(collect()):
        head, data = raw.strip().split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert head == f"event: {body['type']}"
        out.append(body)
    return out


def test_responses_stream_reasoning_text_and_call():
    call = ToolCall("call_1", "f", '{"a": 1}', True)
    deltas = [Delta(reasoning="Think"), Delta(reasoning="ing."), Delta(content="Hi."),
              Delta(tool_calls=[ToolCallDelta(0, "call_1", "f", '{"a"')]), Delta(tool_calls=[ToolCallDelta(0, None, None, ": 1}")])]
    outcome = Outcome(prompt_tokens=3, completion_tokens=9, content="Hi.", reasoning="Thinking.", tool_calls=[call],
                      finish_reason="tool_calls")
    events = events_of(deltas, outcome)
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Thinking."
    assert final["output"][2]["arguments"] == '{"a": 1}' and final["output"][2]["call_id"] == "call_1"
    assert [i["type"] for i in output_items(outcome)] == ["reasoning", "message", "function_call"]
    assert final["usage"]["total_tokens"] == 12


def test_responses_stream_length_and_error():
    events = events_of([Delta(content="a")], Outcome(prompt_tokens=1, completion_tokens=1, finish_reason="length"))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    failed = Outcome(prompt_tokens=1, error=APIError(500, "boom"), finish_reason="error")
    events = events_of([], failed)
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["message"] == "boom"
    empty = events_of([], Outcome(prompt_tokens=1))  # nothing said: still one empty message
    assert empty[-1]["response"]["output"][0]["content"][0]["text"] == ""


def test_ollama_messages_tools_and_options():
    body = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "thinking": "tool time", "tool_calls": [
            {"function": {"name": "a", "arguments": {"x": 1}}}, {"function": {"name": "b", "arguments": {}}}]},
        {"role": "tool", "content": "ra", "tool_name": "a"}, {"role": "tool", "content": "rb", "tool_name": "b"}],
        "tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}]})
    msgs = oc.chat_messages(body)
    assert msgs[1]["reasoning_content"] == "tool time"
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["call_1", "call_2"]
    assert json.loads(msgs[1]["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    assert [(m["tool_call_id"], m["name"]) for m in msgs[2:]] == [("call_1", "a"), ("call_2", "b")]
    assert oc.chat_tools(body) == [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}]
    s = oc.sampling(Options(temperature=0.5, top_k=3, num_predict=-1, stop=["x"], repeat_penalty=1.1, seed=4))
    assert (s["temperature"], s["top_k"], s["max_tokens"], s["stop"], s["repetition_penalty"], s["seed"]) == (
        0.5, 3, None, ["x"], 1.1, 4)
    assert oc.sampling(Options(num_predict=7))["max_tokens"] == 7
    assert oc.sampling(None)["temperature"] is None  # left out: the model's default applies


def test_ollama_refusals():
    with pytest.raises(APIError) as e:
        oc.chat_messages(ChatRequest.model_validate({"model": "m", "messages": [{"role": "robot", "content": ""}]}))
    assert e.value.param == "messages[0].role"
    with pytest.raises(APIError) as e:
        oc.format_schema(ChatRequest.model_validate({"model": "m", "format": "yaml"}))
    assert e.value.param == "format"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert oc.format_schema(ChatRequest.model_validate({"model": "m", "format": schema})) == schema
    assert oc.format_schema(ChatRequest.model_validate({"model": "m", "format": "json"})) == {"type": "object"}
    assert oc.format_schema(ChatRequest.model_validate({"model": "m", "format": ""})) is None
    with pytest.raises(APIError) as e:
        oc.generate_messages(GenerateRequest.model_validate({"model": "m", "prompt": "x", "suffix": "y"}))
    assert e.value.param == "suffix"
    gen = GenerateRequest.model_validate({"model": "m", "prompt": "Hi", "system": "Be brief."})
    assert oc.generate_messages(gen) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
