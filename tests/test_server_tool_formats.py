"""GLM-4.5+, MiniMax-M2 and Kimi K2.5 tool calls through a live ``moemesh serve`` and the openai SDK.

Each family gets a tiny scripted checkpoint (tests/scripted_ckpt.py: the output head fitted so that
greedy decoding writes the script) with a chat template in that family's syntax, shortened from the
released templates: tools declared, assistant calls and tool results rendered the family's way. The
server picks the parser from the template (tokenizer/formats/tool_formats.py), so what is checked is the
server's own reading of each format: a call with text before it, streamed deltas adding up, the answer
after the tool result, and a call forced by tool_choice (prefilled in the family's syntax). GLM's tags
are plain tokens; MiniMax's block tag and Kimi's section tokens are special tokens, as in their
releases, so the parser sees them only because the server keeps the markers when detokenizing."""
from __future__ import annotations

import json

import openai
import pytest

from moemesh.server.launcher import ServerProcess
from scripted_ckpt import SCALE, Scripted, make_checkpoint

EOS = "<|endoftext|>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
ARGS = {"city": "Paris", "days": 3}

GLM_TEMPLATE = (
    "[gMASK]<sop>{% if tools %}<|system|>\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call a function as <tool_call>{name}\n<arg_key>{key}</arg_key>\n<arg_value>{value}</arg_value>\n</tool_call>"
    "{% endif %}{% for m in messages %}{% if m.role == 'user' %}<|user|>\n{{ m.content }}"
    "{% elif m.role == 'assistant' %}<|assistant|>\n{{ m.content or '' }}{% for tc in m.tool_calls or [] %}"
    "\n<tool_call>{{ tc.function.name }}{% for k, v in tc.function.arguments.items() %}\n<arg_key>{{ k }}</arg_key>"
    "\n<arg_value>{{ v if v is string else v | tojson }}</arg_value>{% endfor %}\n</tool_call>{% endfor %}"
    "{% elif m.role == 'tool' %}<|observation|>\n<tool_response>\n{{ m.content }}\n</tool_response>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MINIMAX_TEMPLATE = (
    "{% if tools %}]~!b[]~b]system\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    "Call tools as <minimax:tool_call>\n<invoke name=\"...\">\n<parameter name=\"...\">...</parameter>\n</invoke>\n"
    "</minimax:tool_call>[e~[\n{% endif %}{% for m in messages %}{% if m.role == 'user' %}]~b]user\n{{ m.content }}[e~[\n"
    "{% elif m.role == 'assistant' %}]~b]ai\n{{ m.content or '' }}{% if m.tool_calls %}\n<minimax:tool_call>\n"
    "{% for tc in m.tool_calls %}<invoke name=\"{{ tc.function.name }}\">\n{% for k, v in tc.function.arguments.items() %}"
    "<parameter name=\"{{ k }}\">{{ v if v is string else v | tojson }}</parameter>\n{% endfor %}</invoke>\n"
    "{% endfor %}</minimax:tool_call>{% endif %}[e~[\n{% elif m.role == 'tool' %}]~b]tool\n<response>{{ m.content }}"
    "</response>[e~[\n{% endif %}{% endfor %}{% if add_generation_prompt %}]~b]ai\n{% endif %}")
KIMI_TEMPLATE = (
    "{% if tools %}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}<|im_user|>user<|im_middle|>{{ m.content }}<|im_end|>"
    "{% elif m.role == 'assistant' %}<|im_assistant|>assistant<|im_middle|>{{ m.content or '' }}{% if m.tool_calls %}"
    "<|tool_calls_section_begin|>{% for tc in m.tool_calls %}<|tool_call_begin|>{{ tc.id }}"
    "<|tool_call_argument_begin|>{{ tc.function.arguments | tojson }}<|tool_call_end|>{% endfor %}"
    "<|tool_calls_section_end|>{% endif %}<|im_end|>{% elif m.role == 'tool' %}<|im_system|>tool<|im_middle|>"
    "## Return of {{ m.tool_call_id }}\n{{ m.content }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}")


def glm_call(args: dict) -> str:
    pairs = "".join(f"\n<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>" for k, v in args.items())
    return f"<tool_call>get_weather{pairs}\n</tool_call>"


def minimax_call(args: dict) -> str:
    params = "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in args.items())
    return f'<minimax:tool_call>\n<invoke name="get_weather">\n{params}</invoke>\n</minimax:tool_call>'


KIMI_ID = "functions.get_weather:0"


def kimi_call(args: dict) -> str:
    return (f"<|tool_calls_section_begin|><|tool_call_begin|>{KIMI_ID}<|tool_call_argument_begin|>"
            f"{json.dumps(args)}<|tool_call_end|><|tool_calls_section_end|>")


FAMILIES = {
    # name: (template, plain added tokens, special tokens beside EOS, a call in its syntax, forced continuation)
    "glm": (GLM_TEMPLATE, ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
                           "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"], [],
            glm_call, "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
                      "<arg_value>3</arg_value>\n</tool_call>"),
    "minimax": (MINIMAX_TEMPLATE, ["]~!b[", "]~b]", "[e~["], ["<minimax:tool_call>", "</minimax:tool_call>"],
                minimax_call, '<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n'
                              "</invoke>\n</minimax:tool_call>"),
    "kimi": (KIMI_TEMPLATE, [], ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
                                 "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                                 "<|tool_call_argument_begin|>", "<|tool_call_end|>"],
             kimi_call, '0<|tool_call_argument_begin|>{"city": "Paris", "days": 3}<|tool_call_end|>'
                        "<|tool_calls_section_end|>"),
}


def history(fam: str, call_id: str) -> list[dict]:
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}
    return [*QUESTION, {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}]


def scripts(fam: str) -> dict[str, Scripted]:
    call = FAMILIES[fam][3](ARGS)
    answer_id = KIMI_ID if fam == "kimi" else "call_x"  # GLM and MiniMax templates do not render call ids
    return {
        "call": Scripted({"messages": QUESTION, "tools": [WEATHER]}, f"Let me check.\n{call}{EOS}"),
        "answer": Scripted({"messages": history(fam, answer_id), "tools": [WEATHER]}, f"Sunny, 24 C.{EOS}"),
        "named": Scripted({"messages": QUESTION, "tools": [WEATHER],
                           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                          f"{FAMILIES[fam][4]}{EOS}"),
    }


def config_for(vocab_size: int):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(vocab_size=vocab_size, num_hidden_layers=2, hidden_size=256, intermediate_size=64,
                         moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                         max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    fam = request.param
    template, plain, special, _, _ = FAMILIES[fam]
    d = tmp_path_factory.mktemp(f"{fam}-scripted")
    (d / "chat_template.jinja").write_text(template)
    margin = make_checkpoint(d, config_for, list(scripts(fam).values()), special=[EOS, *special], plain=plain, eos=[EOS])
    assert margin > SCALE / 2
    with ServerProcess(str(d), "--threads", "1", "--quant", "none", "--served-model-name", fam) as srv:
        yield fam, openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="none", max_retries=0, timeout=60)


def create(served, body: dict, **kw):
    fam, client = served
    return client.chat.completions.create(model=fam, temperature=0, max_tokens=80, **body, **kw)


def test_call_with_text_before_it(served):
    fam = served[0]
    choice = create(served, scripts(fam)["call"].body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", ARGS)  # days typed: 3
    if fam == "kimi":
        assert call.id == KIMI_ID


def test_streamed_deltas_add_up(served):
    fam = served[0]
    chunks = [c for c in create(served, scripts(fam)["call"].body, stream=True) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me check."  # no tag leaks into content
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(t.function.arguments or "" for t in calls)) == ARGS
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_answer_after_the_tool_result(served):
    fam = served[0]
    call = create(served, scripts(fam)["call"].body).choices[0].message.tool_calls[0]
    body = {**scripts(fam)["answer"].body, "messages": history(fam, call.id)}
    choice = create(served, body).choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == ("stop", "Sunny, 24 C.", None)


def test_forced_tool_choice_prefills_the_family_syntax(served):
    fam = served[0]
    for stream in (False, True):
        r = create(served, scripts(fam)["named"].body, stream=stream)
        if stream:
            chunks = [c for c in r if c.choices]
            calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
            got = (calls[0].function.name, "".join(t.function.arguments or "" for t in calls))
            finish = chunks[-1].choices[0].finish_reason
        else:
            (call,) = r.choices[0].message.tool_calls
            got, finish = (call.function.name, call.function.arguments), r.choices[0].finish_reason
        assert (got[0], json.loads(got[1]), finish) == ("get_weather", ARGS, "tool_calls")
