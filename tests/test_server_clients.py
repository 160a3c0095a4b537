"""Real clients against a live ``moemesh serve`` of a scripted checkpoint: the ``openai`` SDK's
``responses.create`` (plain, streamed, a function-tool round trip), the ``ollama`` Python client
(chat, generate, streams, tags, show, ps, a tool round trip) and a pydantic-ai agent that calls a
tool and answers from its result.

The checkpoint (tests/scripted_ckpt.py) is fitted so that greedy decoding of each conversation
writes its script; the prompts it was fitted to are the ones the clients' requests must render
to, so a script comes out only if the server turned the client's request (Responses input items,
Ollama messages and tool calls, the framework's tool schema and history) into the right prompt.
The agent framework's request bodies are not guessed: a first run against a recorder
(tests/recorder.py) captures them. Its generation_config.json recommends top_k 1 (greedy), which
the server applies to requests that leave top_k out (every request here but one)."""
from __future__ import annotations

import json

import openai
import pytest

from moemesh.server.launcher import ServerProcess
from recorder import Recorder
from scripted_ckpt import SCALE, Scripted, make_checkpoint

ollama = pytest.importorskip("ollama")

EOS = "<|im_end|>"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # no tools: Hermes' prompt
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                              "parameters": WEATHER_PARAMS}}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "Get the weather in a city",
                  "parameters": WEATHER_PARAMS}
GREETING = "Hello! I am a scripted model."
RESULT = "sunny, 24 C"


def hermes_call(name: str, args: dict) -> str:
    """A tool call as a Hermes model writes it."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def call_text(city: str) -> str:
    return hermes_call("get_weather", {"city": city})


def turn(city: str, tool: dict, preamble: str) -> tuple[list[dict], list[dict]]:
    """(question, history after the call and its result) as chat messages."""
    question = [{"role": "user", "content": f"What is the weather in {city}?"}]
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    history = [*question, {"role": "assistant", "content": preamble, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    return question, history


def ollama_tools() -> list[dict]:
    """The tools as the ollama client sends them (its Tool model reorders the schema's keys)."""
    request = ollama._types.ChatRequest(model="m", messages=[], tools=[CHAT_TOOL])
    return request.model_dump(exclude_none=True)["tools"]


# the agent: pydantic-ai over the chat completions API
AGENT_CITY = "Oslo"
AGENT_ANSWER = f"It is {RESULT} in {AGENT_CITY}."


def run_agent(base_url: str, calls: list[str]) -> str:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("scripted", provider=OpenAIProvider(base_url=f"{base_url}/v1", api_key="none"))
    agent = Agent(model)

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        calls.append(city)
        return RESULT

    return agent.run_sync(f"What is the weather in {AGENT_CITY}?").output


def completion(message: dict, finish: str) -> dict:
    return {"id": "chatcmpl-rec", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def agent_bodies() -> list[dict]:
    """The two chat requests the agent makes, recorded from replies shaped as the server's will be
    (a call without text, then the answer)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": AGENT_CITY})}}
    replies = [completion({"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"),
               completion({"role": "assistant", "content": AGENT_ANSWER}, "stop")]
    calls: list[str] = []
    with Recorder(replies) as rec:
        assert run_agent(rec.base_url, calls) == AGENT_ANSWER and calls == [AGENT_CITY]
    assert rec.paths == ["/v1/chat/completions"] * 2
    return [{k: b[k] for k in ("messages", "tools", "tool_choice") if k in b} for b in rec.bodies]


def scripts(agent: list[dict]) -> list[Scripted]:
    rq, rh = turn("Paris", CHAT_TOOL, "Let me check.")
    oq, oh = turn("Rome", CHAT_TOOL, "Let me check.")
    tools = ollama_tools()
    return [
        Scripted({"messages": [{"role": "user", "content": "Say hello."}]}, GREETING + EOS),
        Scripted({"messages": rq, "tools": [CHAT_TOOL]}, f"Let me check.\n{call_text('Paris')}{EOS}"),
        Scripted({"messages": rh, "tools": [CHAT_TOOL]}, f"It is {RESULT} in Paris.{EOS}"),
        Scripted({"messages": oq, "tools": tools}, f"Let me check.\n{call_text('Rome')}{EOS}"),
        Scripted({"messages": oh, "tools": tools}, f"It is {RESULT} in Rome.{EOS}"),
        Scripted(agent[0], f"{call_text(AGENT_CITY)}{EOS}"),
        Scripted(agent[1], AGENT_ANSWER + EOS),
    ]


def config_for(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=384, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=96, max_position_embeddings=4096,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("clients-scripted")
    (d / "chat_template.jinja").write_text(TEMPLATE)
    margin = make_checkpoint(d, config_for, scripts(agent_bodies()), special=[EOS, "<|im_start|>"],
                             plain=["<tool_call>", "</tool_call>"], eos=[EOS])
    assert margin > SCALE / 2
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1, "top_p": 0.9}))  # recommended: greedy
    with ServerProcess(str(d), "--threads", "1", "--quant", "none", "--served-model-name", "scripted") as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oll(served):
    return ollama.Client(host=served.base_url, timeout=60)


# --- the model's recommended sampling


def test_recommended_sampling_is_shown(oai, oll):
    (card,) = oai.models.list().data
    assert card.sampling_defaults == {"top_k": 1, "top_p": 0.9}
    show = oll.show("scripted")
    assert show.parameters.split() == ["top_p", "0.9", "top_k", "1"]
    assert "PARAMETER top_k" in show.modelfile and show.capabilities == ["completion", "tools"]


def test_recommended_top_k_applies_when_left_out(oai):
    """At temperature 8 nearly every token would leave the script (its logit is 20, the rest ~0),
    unless the recommended top_k 1 applies; a request that sets top_k itself overrides it."""
    hello = [{"role": "user", "content": "Say hello."}]
    said = [oai.chat.completions.create(model="scripted", messages=hello, temperature=8, seed=s).choices[0]
            .message.content for s in range(3)]
    assert said == [GREETING] * 3
    wild = oai.chat.completions.create(model="scripted", messages=hello, temperature=8, seed=0, max_tokens=8,
                                       extra_body={"top_k": 0}).choices[0].message.content
    assert wild != GREETING
    r = oai.responses.create(model="scripted", input="Say hello.", temperature=2)
    assert r.output_text == GREETING and r.temperature == 2 and r.top_p == 0.9  # the default top_p shows


# --- OpenAI Responses API through the openai SDK


def test_responses_plain_and_streamed(oai):
    r = oai.responses.create(model="scripted", input=[{"role": "user", "content": "Say hello."}])
    assert r.status == "completed" and r.output_text == GREETING and r.output[0].type == "message"
    assert r.usage.input_tokens > 5 and r.usage.output_tokens == r.usage.total_tokens - r.usage.input_tokens
    events = list(oai.responses.create(model="scripted", input="Say hello.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == GREETING
    assert events[-1].response.output_text == GREETING
    short = oai.responses.create(model="scripted", input="Say hello.", max_output_tokens=2)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_responses_function_tool_round_trip(oai):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.responses.create(model="scripted", input=ask, tools=[RESPONSES_TOOL])
    kinds = [item.type for item in r.output]
    assert kinds == ["message", "function_call"] and r.output[0].content[0].text == "Let me check."
    call = r.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    streamed = list(oai.responses.create(model="scripted", input=ask, tools=[RESPONSES_TOOL], stream=True))
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    # the client sends the output back with the tool's result: the model answers from it
    follow = oai.responses.create(model="scripted", tools=[RESPONSES_TOOL], input=[
        *ask, *r.output, {"type": "function_call_output", "call_id": call.call_id, "output": RESULT}])
    assert follow.output_text == f"It is {RESULT} in Paris." and [i.type for i in follow.output] == ["message"]


def test_responses_errors(oai):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model="scripted", input="Say hello.", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="web_search"):
        oai.responses.create(model="scripted", input="Say hello.", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]"):
        oai.responses.create(model="scripted", input=[{"type": "input_image", "image_url": "x"}])
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="other", input="Say hello.")


# --- Ollama's API through the ollama client


def test_ollama_tags_ps_version(oll, served):
    (m,) = oll.list().models
    assert m.model == "scripted:latest" and m.size > 0 and m.details.family == "llama"
    (p,) = oll.ps().models
    assert p.model == "scripted:latest" and p.context_length == 4096
    assert served.get_json("/api/version")["version"]


def test_ollama_chat_and_generate(oll):
    hello = [{"role": "user", "content": "Say hello."}]
    r = oll.chat(model="scripted", messages=hello)
    assert r.message.content == GREETING and r.done and r.done_reason == "stop" and r.eval_count > 3
    parts = list(oll.chat(model="scripted:latest", messages=hello, stream=True))
    assert "".join(p.message.content for p in parts) == GREETING and parts[-1].done and not parts[0].done
    short = oll.chat(model="scripted", messages=hello, options={"num_predict": 2})
    assert short.done_reason == "length" and short.eval_count == 2
    g = oll.generate(model="scripted", prompt="Say hello.")
    assert g.response == GREETING and len(g.context) == g.prompt_eval_count + g.eval_count
    streamed = list(oll.generate(model="scripted", prompt="Say hello.", stream=True))
    assert "".join(p.response for p in streamed) == GREETING and streamed[-1].context == g.context
    stopped = oll.generate(model="scripted", prompt="Say hello.", options={"stop": ["!"]})
    assert stopped.response == "Hello"


def test_ollama_tool_round_trip(oll):
    ask = [{"role": "user", "content": "What is the weather in Rome?"}]
    r = oll.chat(model="scripted", messages=ask, tools=[CHAT_TOOL])
    (call,) = r.message.tool_calls
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    assert r.message.content == "Let me check."
    parts = list(oll.chat(model="scripted", messages=ask, tools=[CHAT_TOOL], stream=True))
    assert [c.function.arguments for p in parts for c in p.message.tool_calls or []] == [{"city": "Rome"}]
    follow = oll.chat(model="scripted", tools=[CHAT_TOOL], messages=[
        *ask, r.message, {"role": "tool", "content": RESULT, "tool_name": "get_weather"}])
    assert follow.message.content == f"It is {RESULT} in Rome." and not follow.message.tool_calls


def test_ollama_errors(oll):
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="other", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "does not exist" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="scripted", messages=[{"role": "user", "content": "hi"}],
                 format={"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
    assert e.value.status_code == 400 and "uniqueItems" in e.value.error  # a schema the grammar cannot enforce


# --- an agent framework


def test_pydantic_ai_agent_calls_the_tool_and_uses_its_result(served):
    calls: list[str] = []
    assert run_agent(served.base_url, calls) == AGENT_ANSWER
    assert calls == [AGENT_CITY]
