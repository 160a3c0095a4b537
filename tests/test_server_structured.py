"""Structured output through ``moemesh serve smollm2`` with the real SDKs: response_format
json_schema / json_object answers parse and validate (temperature 0 and 1, whole and streamed),
forced tool calls always parse with arguments valid under the tool's schema (OpenAI and
Anthropic), Ollama's ``format`` (a schema or "json") through the ollama client, and schema features
that cannot be enforced get a 400 that names them."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import jsonschema
import ollama
import openai
import pytest

from test_server_openai import KEY, shared_server

SCHEMAS = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text()).items()
           if not k.startswith("_")}
CITY_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
SUM_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (CITY_TOOL, SUM_TOOL)}


@pytest.fixture(scope="module")
def server(request):
    return shared_server(request.config, "main")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=300)


def _ask(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Write one {name} record as JSON."}]


def _json_schema(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]["schema"], "strict": True}}


def test_json_schema_answers_validate_at_temperature_0_and_1(client):
    jobs = [(name, temp, seed) for name in ("order", "meeting", "shape", "settings") for temp, seed in ((0, None), (1, 7))]

    def ask(job):
        name, temp, seed = job
        return client.chat.completions.create(model="smollm2", messages=_ask(name), temperature=temp, seed=seed,
                                              max_tokens=300, response_format=_json_schema(name))

    with ThreadPoolExecutor(len(jobs)) as pool:  # one batch in the engine
        answers = list(pool.map(ask, jobs))
    for (name, temp, _), r in zip(jobs, answers):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (name, temp, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name]["schema"])


def test_json_object_streamed(client):
    # greedy: json_object bounds no string, so a sampled answer may run to max_tokens (finish_reason length)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France? Answer as a JSON object."}], temperature=0,
        max_tokens=200, response_format={"type": "json_object"}, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
@pytest.mark.parametrize("temperature", [0, 1])
def test_forced_tool_calls_parse_and_validate(client, choice, temperature):
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What will the weather be in Lisbon this week?"}],
        tools=[CITY_TOOL, SUM_TOOL], tool_choice=choice, temperature=temperature, seed=11, max_tokens=120)
    out = r.choices[0]
    assert out.finish_reason == "tool_calls"
    (call,) = out.message.tool_calls
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_anthropic_forced_tool_use_validates(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)
    tool = {"name": "get_weather", "description": "Get the weather forecast for a city",
            "input_schema": PARAMS["get_weather"]}
    msg = client.messages.create(model="smollm2", max_tokens=120,  # temperature: the default, 1
                                 messages=[{"role": "user", "content": "Weather in Rome for 3 days?"}],
                                 tools=[tool], tool_choice={"type": "tool", "name": "get_weather"})
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, PARAMS["get_weather"])


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"x": {"not": {"type": "null"}}}}, "not"),
    ({"type": "string", "format": "ipv9"}, "ipv9"),
])
def test_unsupported_schema_features_get_400_naming_them(client, schema, named):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=_ask("thing"), max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    body = err.value.body
    assert named in body["message"] and body["param"] == "response_format.json_schema.schema"


def test_bad_response_format_and_tool_schema_get_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=_ask("thing"), max_tokens=8,
                                       response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=_ask("thing"), max_tokens=8,
                                       response_format={"type": "json_schema"})
    assert err.value.body["param"] == "response_format.json_schema"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "contains": {"const": 1}}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=_ask("thing"), max_tokens=8, tools=[bad_tool],
                                       tool_choice="required")
    assert "contains" in err.value.body["message"] and err.value.body["param"] == "tools"


def test_completions_follow_response_format(client):
    r = client.completions.create(model="smollm2", prompt="A rectangle, as JSON: ", max_tokens=60, temperature=0,
                                  extra_body={"response_format": _json_schema("shape")})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["shape"]["schema"])


def test_ollama_format_schema_and_json(server):
    # Ollama's structured output: format = a JSON schema (chat and generate) or "json" (any object)
    oll = ollama.Client(host=server.base_url, timeout=300, headers={"Authorization": f"Bearer {KEY}"})
    schema = SCHEMAS["order"]["schema"]
    r = oll.chat(model="smollm2", messages=_ask("order"), format=schema, options={"temperature": 0, "num_predict": 300})
    assert r.done_reason == "stop", r.message.content
    jsonschema.validate(json.loads(r.message.content), schema)
    g = oll.generate(model="smollm2", prompt="Write one order record as JSON.", format=schema,
                     options={"temperature": 1, "seed": 3, "num_predict": 300})
    assert g.done_reason == "stop", g.response
    jsonschema.validate(json.loads(g.response), schema)
    chunks = list(oll.chat(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France? Answer as a JSON object."}],
                           format="json", stream=True, options={"temperature": 0, "num_predict": 200}))
    assert chunks[-1].done_reason == "stop"
    assert isinstance(json.loads("".join(c.message.content for c in chunks)), dict)
    with pytest.raises(ollama.ResponseError) as e:  # what the grammar cannot enforce: a 400 naming it
        oll.chat(model="smollm2", messages=_ask("order"),
                 format={"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
    assert e.value.status_code == 400 and "uniqueItems" in e.value.error
