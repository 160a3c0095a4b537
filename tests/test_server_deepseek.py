"""DeepSeek's chat format through a live ``moemesh serve`` and the openai SDK: a tiny deepseek_v3
checkpoint without a chat template (the server renders DeepSeek-V3's format itself), whose output
head is fitted so that greedy decoding writes scripted DeepSeek output (tests/scripted_ckpt.py):
``<think>`` reasoning, ``<｜tool▁calls▁begin｜>`` calls, answers after ``<｜tool▁outputs▁end｜>``, and
calls forced by tool_choice, which prefill DeepSeek's own call syntax."""
from __future__ import annotations

import json

import openai
import pytest

from moemesh.server.launcher import ServerProcess
from moemesh.tokenizer.formats import deepseek_chat
from moemesh.tokenizer.formats.chat_prompt import build_chat_prompt
from moemesh.tokenizer.formats.deepseek_tools import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from moemesh.tokenizer.tokenizer import Tokenizer
from scripted_ckpt import SCALE, Scripted, make_checkpoint

MODEL = "deepseek-tiny"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = deepseek_chat.USER, deepseek_chat.ASSISTANT
OUTPUTS = (deepseek_chat.OUTPUTS_BEGIN, deepseek_chat.OUTPUTS_END, deepseek_chat.OUTPUT_BEGIN, deepseek_chat.OUTPUT_END)
PLAIN = [USER, ASSISTANT, "<think>", "</think>", CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, *OUTPUTS]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}]
THOUGHT = "The user asks for the weather in Paris."
ARGS = '{"city": "Paris"}'


def call_block(name: str, args: str) -> str:
    return f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}{CALLS_END}"


def history(call_id: str, arguments: str) -> list[dict]:
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}]


CALL = Scripted({"messages": QUESTION, "tools": [WEATHER]},
                f"<think>\n{THOUGHT}\n</think>\n\n{call_block('get_weather', ARGS)}{EOS}")
ANSWER = Scripted({"messages": history("call_1", ARGS), "tools": [WEATHER]}, f"It is sunny and 24 C in Paris.{EOS}")
NAMED = Scripted({"messages": QUESTION, "tools": [WEATHER],
                  "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                 f"{ARGS}\n```{CALL_END}{CALLS_END}{EOS}")
REQUIRED = Scripted({"messages": QUESTION, "tools": [WEATHER, TIME], "tool_choice": "required"},
                    f"get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}{EOS}")
HELLO = Scripted({"messages": [{"role": "user", "content": "Say hello."}]}, f"<think>\nGreet.\n</think>\n\nHello!{EOS}")


def config_for(vocab_size: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=vocab_size, num_hidden_layers=2, hidden_size=256, intermediate_size=64,
                            moe_intermediate_size=32, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
                            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                            topk_group=1, max_position_embeddings=4096, rms_norm_eps=1e-5,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("deepseek-scripted")
    margin = make_checkpoint(d, config_for, [CALL, ANSWER, NAMED, REQUIRED, HELLO], special=[BOS, EOS], plain=PLAIN,
                             eos=[EOS], bos=BOS)
    assert margin > SCALE / 2  # the fit itself: every scripted token wins by a wide margin
    return d


@pytest.fixture(scope="module")
def client(ckpt):
    with ServerProcess(str(ckpt), "--threads", "1", "--quant", "none", "--served-model-name", MODEL) as srv:
        yield openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="none", max_retries=0, timeout=60)


def create(client, body: dict, **kw):
    return client.chat.completions.create(model=MODEL, temperature=0, max_tokens=80, **body, **kw)


def test_render_follows_deepseek_v3():
    msgs = history("c1", ARGS) + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    assert deepseek_chat.render(msgs, bos=BOS) == (
        f"{BOS}Be brief.{USER}What is the weather in Paris?{ASSISTANT}{call_block('get_weather', ARGS)}{EOS}"
        f"{OUTPUTS[0]}{OUTPUTS[2]}sunny, 24 C{OUTPUTS[3]}{OUTPUTS[1]}Sunny.{EOS}{USER}Thanks{ASSISTANT}")
    two = history("c1", ARGS)
    two[2]["tool_calls"].append({"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {}}})
    two.append({"role": "tool", "tool_call_id": "c2", "content": "noon"})
    assert deepseek_chat.render(two).endswith(
        f"{CALL_END}\n{CALL_BEGIN}function{SEP}get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}{EOS}"
        f"{OUTPUTS[0]}{OUTPUTS[2]}sunny, 24 C{OUTPUTS[3]}\n{OUTPUTS[2]}noon{OUTPUTS[3]}{OUTPUTS[1]}")
    with_tools = deepseek_chat.render(QUESTION, [WEATHER])
    assert with_tools.startswith("Be brief.\n\n# Tools\n\n") and json.dumps(WEATHER) in with_tools
    assert f"{CALL_BEGIN}function{SEP}<function_name>\n```json\n" in with_tools


def test_prompt_without_template_is_deepseek(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    assert tok.chat_template is None and deepseek_chat.uses_deepseek(tok) and deepseek_chat.writes_deepseek_tools(tok)
    plan = build_chat_prompt(tok, ANSWER.body["messages"], [WEATHER], None)
    assert plan.text == deepseek_chat.render(ANSWER.body["messages"], [WEATHER], bos=BOS) and plan.prefill == ""
    forced = build_chat_prompt(tok, QUESTION, [WEATHER], {"name": "get_weather"})
    assert forced.prefill == f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n"
    assert forced.text.endswith(ASSISTANT + forced.prefill)
    any_tool = build_chat_prompt(tok, QUESTION, [WEATHER, TIME], "required")
    assert any_tool.prefill == f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}"


def test_forced_call_closes_an_open_think():
    """A template whose generation prompt opens <think> (R1's): the forced call comes after it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    template = ("{% for m in messages %}<｜User｜>{{ m.content }}{% endfor %}<｜Assistant｜><think>\n"
                "{% if false %}" + CALLS_BEGIN + "{% endif %}")
    tok = Tokenizer(Backend(models.BPE()), bos_token_id=None, eos_token_ids=[], chat_template=template)
    plan = build_chat_prompt(tok, QUESTION[1:], [WEATHER], {"name": "get_weather"})
    assert plan.text.endswith("<think>\n</think>\n\n" + deepseek_chat.forced_prefill("get_weather"))
    assert plan.prefill == deepseek_chat.forced_prefill("get_weather") and not plan.start_in_reasoning


def test_reasoning_then_tool_call(client):
    choice = create(client, CALL.body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == f"\n{THOUGHT}\n"  # between the tags, as the model wrote it
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_weather",
                                                                                     {"city": "Paris"})


def test_streamed_deltas_add_up_to_the_whole(client):
    chunks = [c for c in create(client, CALL.body, stream=True) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
    assert len([x for x in reasoning if x]) >= 2 and "".join(x or "" for x in reasoning) == f"\n{THOUGHT}\n"
    assert not "".join(d.content or "" for d in deltas)  # no tags leak into content
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert "".join(t.function.arguments or "" for t in calls) == ARGS
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_answer_after_the_tool_result(client):
    call = create(client, CALL.body).choices[0].message.tool_calls[0]
    body = {**ANSWER.body, "messages": history(call.id, call.function.arguments)}
    choice = create(client, body).choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == (
        "stop", "It is sunny and 24 C in Paris.", None)
    streamed = "".join(c.choices[0].delta.content or "" for c in create(client, body, stream=True) if c.choices)
    assert streamed == choice.message.content


def test_plain_answer_without_tools(client):
    choice = create(client, HELLO.body).choices[0]
    assert (choice.message.content, choice.message.reasoning_content, choice.finish_reason) == ("Hello!", "\nGreet.\n", "stop")


def test_forced_tool_choice_prefills_deepseek_syntax(client):
    for scripted, name, args in ((NAMED, "get_weather", {"city": "Paris"}), (REQUIRED, "get_time", {})):
        for stream in (False, True):
            r = create(client, scripted.body, stream=stream)
            if stream:
                chunks = [c for c in r if c.choices]
                calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
                got = (calls[0].function.name, "".join(t.function.arguments or "" for t in calls))
                finish = chunks[-1].choices[0].finish_reason
            else:
                (call,) = r.choices[0].message.tool_calls
                got, finish = (call.function.name, call.function.arguments), r.choices[0].finish_reason
            assert (got[0], json.loads(got[1]), finish) == (name, args, "tool_calls")
