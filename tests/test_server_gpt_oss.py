"""Harmony (gpt-oss) through a live ``moemesh serve`` and the openai SDK: a tiny gpt_oss checkpoint
without a chat template (the server renders Harmony itself), whose output head is fitted so that
greedy decoding writes scripted Harmony output (tests/scripted_ckpt.py). Reasoning must come back
as ``reasoning_content``, calls as ``tool_calls`` with JSON arguments, the answer as ``content``,
streamed and whole; the raw channel tokens never reach the client."""
from __future__ import annotations

import json

import openai
import pytest

from moemesh.server.launcher import ServerProcess
from moemesh.tokenizer.formats import harmony
from moemesh.tokenizer.formats.chat_prompt import build_chat_prompt
from moemesh.tokenizer.tokenizer import Tokenizer
from scripted_ckpt import SCALE, Scripted, make_checkpoint

MODEL = "gpt-oss-tiny"
SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>",
           "<|constrain|>", "<|return|>", "<|call|>"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
THOUGHT = "The user asks for the weather in Paris. Call get_weather."
ARGS = '{"city": "Paris"}'


def history(call_id: str, arguments: str, reasoning: str | None) -> list[dict]:
    """The question, the assistant's call as a client sends it back, and the tool's result."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    return [*QUESTION, assistant, {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}]


CALL = Scripted({"messages": QUESTION, "tools": [WEATHER]},
                f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>commentary "
                f"to=functions.get_weather <|constrain|>json<|message|>{ARGS}<|call|>")
ANSWER = Scripted({"messages": history("call_1", ARGS, THOUGHT), "tools": [WEATHER]},
                  "<|channel|>analysis<|message|>The tool says sunny.<|end|><|start|>assistant<|channel|>final"
                  "<|message|>It is sunny and 24 C in Paris.<|return|>")
NAMED = Scripted({"messages": QUESTION, "tools": [WEATHER],
                  "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, f"{ARGS}<|call|>")
REQUIRED = Scripted({"messages": QUESTION, "tools": [WEATHER, TIME], "tool_choice": "required"},
                    "get_time <|constrain|>json<|message|>{}<|call|>")
HELLO = Scripted({"messages": [{"role": "user", "content": "Say hello."}]},
                 "<|channel|>analysis<|message|>Greet.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>")


def config_for(vocab_size: int):
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=vocab_size, num_hidden_layers=2, hidden_size=256, intermediate_size=32,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
                        eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_oss-scripted")
    margin = make_checkpoint(d, config_for, [CALL, ANSWER, NAMED, REQUIRED, HELLO], special=SPECIAL,
                             eos=["<|return|>", "<|endoftext|>", "<|call|>"])
    assert margin > SCALE / 2  # the fit itself: every scripted token wins by a wide margin
    return d


@pytest.fixture(scope="module")
def client(ckpt):
    with ServerProcess(str(ckpt), "--threads", "1", "--quant", "none", "--served-model-name", MODEL) as srv:
        yield openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="none", max_retries=0, timeout=60)


def create(client, scripted: Scripted, **kw):
    return client.chat.completions.create(model=MODEL, temperature=0, max_tokens=80, **scripted.body, **kw)


def test_prompt_without_template_is_harmony(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    assert tok.chat_template is None and harmony.is_harmony(tok)
    plan = build_chat_prompt(tok, ANSWER.body["messages"], [WEATHER], None, {"reasoning_effort": "low"})
    assert plan.text == harmony.render(ANSWER.body["messages"], [WEATHER], reasoning_effort="low")
    assert "Reasoning: low" in plan.text and "type get_weather = (_: {\n// City name\ncity: string,\n}) => any;" in plan.text
    assert (f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
            f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}<|call|>"
            "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny, 24 C<|end|>"
            "<|start|>assistant") in plan.text
    forced = build_chat_prompt(tok, QUESTION, [WEATHER], {"name": "get_weather"})
    assert forced.prefill == "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    assert forced.text.endswith("<|start|>assistant" + forced.prefill)
    stops = harmony.stop_token_ids(tok)  # a Harmony turn goes on past <|end|>
    assert tok.token_to_id("<|end|>") not in stops and tok.token_to_id("<|call|>") in stops


def test_reasoning_then_tool_call(client):
    r = create(client, CALL)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == THOUGHT
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens >= 10


def test_streamed_deltas_add_up_to_the_whole(client):
    chunks = [c for c in create(client, CALL, stream=True) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
    assert len([x for x in reasoning if x]) >= 2  # reasoning streams as it is written
    assert "".join(x or "" for x in reasoning) == THOUGHT
    assert not "".join(d.content or "" for d in deltas)  # no channel tokens leak into content
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert {t.index for t in calls} == {0} and all(t.id is None for t in calls[1:])
    assert "".join(t.function.arguments or "" for t in calls) == ARGS
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_answer_after_the_tool_result(client):
    first = create(client, CALL).choices[0].message
    call = first.tool_calls[0]
    body = {**ANSWER.body, "messages": history(call.id, call.function.arguments, first.reasoning_content)}
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=80, **body)
    choice = r.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("stop", "It is sunny and 24 C in Paris.")
    assert choice.message.reasoning_content == "The tool says sunny." and not choice.message.tool_calls
    chunks = [c for c in client.chat.completions.create(model=MODEL, temperature=0, max_tokens=80, stream=True, **body)
              if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == "The tool says sunny."


def test_plain_answer_without_tools(client):
    choice = create(client, HELLO).choices[0]
    assert (choice.message.content, choice.message.reasoning_content, choice.finish_reason) == ("Hello!", "Greet.", "stop")


def test_forced_tool_choice_prefills_the_call(client):
    for scripted, name, args in ((NAMED, "get_weather", {"city": "Paris"}), (REQUIRED, "get_time", {})):
        for stream in (False, True):
            r = create(client, scripted, stream=stream)
            if stream:
                chunks = [c for c in r if c.choices]
                calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
                got = (calls[0].function.name, "".join(t.function.arguments or "" for t in calls))
                finish = chunks[-1].choices[0].finish_reason
            else:
                (call,) = r.choices[0].message.tool_calls
                got, finish = (call.function.name, call.function.arguments), r.choices[0].finish_reason
            assert (got[0], json.loads(got[1]), finish) == (name, args, "tool_calls")
