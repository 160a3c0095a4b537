"""Server building blocks without a server: stop strings, <think> and <tool_call> parsing, chat
prompts with tools, metrics text, error shapes. Streaming parsers must agree with whole-text
parsing however the text is chunked."""
from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from moemesh.commands.serve import curl_example
from moemesh.experts.budget import parse_size
from moemesh.loading.source import resolve_model_path
from moemesh.server.common.errors import validation_error
from moemesh.server.core.metrics import Metrics
from moemesh.server.core.stop_strings import StopMatcher
from moemesh.server.openai.schemas import ChatCompletionRequest
from moemesh.tokenizer.chat import ChatTemplate
from moemesh.tokenizer.formats.chat_prompt import PromptError, build_chat_prompt
from moemesh.tokenizer.formats.reasoning import ReasoningStream, split_reasoning
from moemesh.tokenizer.formats.tool_parser import ToolCallStream, parse_tool_calls
from moemesh.tokenizer.tokenizer import Tokenizer

CHUNK_SIZES = (1, 2, 3, 5, 8, 1000)


def chunks(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


# ------------------------------------------------------------------ stop strings
def test_stop_string_cut_and_never_emitted():
    m = StopMatcher(["END", "xy"])
    assert [m.feed(t) for t in ["abc E", "N", "D more"]] == ["abc ", "", ""]
    assert m.matched == "END" and m.feed("anything") == "" and m.flush() == ""


@pytest.mark.parametrize("n", CHUNK_SIZES)
def test_stop_strings_chunking_invariant(n):
    text = "one two thr three four"
    m = StopMatcher(["three", "thx"])
    out = "".join(m.feed(c) for c in chunks(text, n)) + m.flush()
    assert out == "one two thr " and m.matched == "three"


def test_stop_earliest_match_wins_and_partial_tail_released_at_end():
    m = StopMatcher(["bc", "abcd"])
    assert m.feed("xxabcd") == "xx" and m.matched == "abcd"
    m = StopMatcher(["STOP"])
    assert m.feed("hello ST") == "hello " and m.flush() == "ST" and m.matched is None


# ------------------------------------------------------------------ reasoning
@pytest.mark.parametrize("n", CHUNK_SIZES)
def test_reasoning_split_chunking_invariant(n):
    text = "<think>\nLet me see: 2+2.\n</think>\n\nIt is 4."
    s = ReasoningStream()
    parts = [s.feed(c) for c in chunks(text, n)] + [s.flush()]
    reasoning, content = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
    assert (reasoning, content) == ("\nLet me see: 2+2.\n", "It is 4.")
    assert split_reasoning(text) == (reasoning, content)


def test_reasoning_open_tag_in_prompt_and_plain_text():
    assert split_reasoning("hmm</think>Answer", start_inside=True) == ("hmm", "Answer")
    assert split_reasoning("no thinking <here") == ("", "no thinking <here")


# ------------------------------------------------------------------ tool calls
QWEN_OUTPUT = (
    'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"}{\\"", '
    '"days": [1, 2]}}\n</tool_call>\n<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>'
)


@pytest.mark.parametrize("n", CHUNK_SIZES)
def test_tool_stream_matches_whole_parse_for_any_chunking(n):
    content_whole, calls_whole = parse_tool_calls(QWEN_OUTPUT)
    s = ToolCallStream()
    content, deltas = "", []
    for c in chunks(QWEN_OUTPUT, n):
        text, d = s.feed(c)
        content, deltas = content + text, deltas + d
    text, d = s.finish()
    content, deltas = content + text, deltas + d
    assert content == content_whole == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in s.calls] == [
        ("get_weather", {"city": 'Paris "}{"', "days": [1, 2]}), ("f", {"a": 1})]
    assert [(c.name, c.arguments) for c in s.calls] == [(c.name, c.arguments) for c in calls_whole]
    # OpenAI's streaming shape: id and name once per call, then argument fragments only
    for index, call in enumerate(s.calls):
        mine = [d for d in deltas if d.index == index]
        assert mine[0].id == call.id and mine[0].name == call.name and mine[0].arguments == ""
        assert all(d.id is None and d.name is None for d in mine[1:])
        assert "".join(d.arguments for d in mine) == call.arguments
    assert all(c.valid and c.id.startswith("call_") for c in s.calls)


def test_tool_call_edge_cases():
    # unclosed final call (model hit a stop token right after the JSON): still a call
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}')
    assert content == "" and calls[0].valid and json.loads(calls[0].arguments) == {"x": 1}
    # arguments written as a JSON string are kept as that string
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>')
    assert calls[0].arguments == '{"x": 2}' and calls[0].valid
    # a body that is not a call stays visible as text
    content, calls = parse_tool_calls("a <tool_call>not json</tool_call> b")
    assert calls == [] and content == "a <tool_call>not json</tool_call> b"
    # cut inside the arguments: a call, but not a valid one
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": [1, ')
    assert len(calls) == 1 and not calls[0].valid and calls[0].arguments == '{"x": [1, '
    assert parse_tool_calls("plain <tool text") == ("plain <tool text", [])


# ------------------------------------------------------------------ chat prompts
@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return Tokenizer.from_gguf(resolve_model_path("smollm2"))


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_template_without_tools_gets_hermes_system_prompt(smol_tok):
    plan = build_chat_prompt(smol_tok, ASK, TOOLS, "auto")
    assert "<tools>" in plan.text and '"name": "get_weather"' in plan.text and plan.prefill == ""
    assert plan.tool_mode is not None and plan.tool_mode.kind == "auto"
    assert plan.text.endswith("<|im_start|>assistant\n")


def test_tool_choice_is_enforced(smol_tok):
    plain = build_chat_prompt(smol_tok, ASK, None, None).text
    assert build_chat_prompt(smol_tok, ASK, TOOLS, "none").text == plain  # the tools are gone
    named = build_chat_prompt(smol_tok, ASK, TOOLS, {"name": "get_time"})
    assert named.text.endswith('<tool_call>\n{"name": "get_time", "arguments": ') and named.tool_mode.forced
    required = build_chat_prompt(smol_tok, ASK, TOOLS, "required")
    assert required.text.endswith('<tool_call>\n{"name": "') and required.tool_mode.name is None
    single = build_chat_prompt(smol_tok, ASK, TOOLS[:1], "required")
    assert single.prefill.endswith('{"name": "get_weather", "arguments": ')
    with pytest.raises(PromptError, match="not among the tools") as e:
        build_chat_prompt(smol_tok, ASK, TOOLS, {"name": "nope"})
    assert e.value.param == "tool_choice"
    with pytest.raises(PromptError, match="needs tools"):
        build_chat_prompt(smol_tok, ASK, None, "required")


def test_history_with_tool_calls_results_and_reasoning(smol_tok):
    history = ASK + [
        {"role": "assistant", "content": None, "reasoning_content": "I should call it.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "tomorrow?"}]},
    ]
    text = build_chat_prompt(smol_tok, history, TOOLS, "auto").text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>" in text
    assert "And\ntomorrow?" in text and "I should call it." not in text  # old reasoning is not replayed
    with pytest.raises(PromptError) as e:
        build_chat_prompt(smol_tok, [{"role": "user", "content": [{"type": "image_url"}]}], None, None)
    assert e.value.param == "messages[0].content[0].type"


class _TemplateTokenizer:
    """A tokenizer stand-in that only renders a real Jinja template (enough for build_chat_prompt)."""

    def __init__(self, source: str) -> None:
        self.chat_template = source
        self._t = ChatTemplate(source)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, **kw):
        return self._t.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kw)


QWEN_LIKE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<tool>{{ m.content }}</tool>\n{% continue %}{% endif %}"
    "<{{ m.role }}>{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
    "{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}[call {{ c.function.name }} "
    "{{ c.function.arguments.city }}]{% endfor %}</{{ m.role }}>\n{% endfor %}<assistant><think>\n"
)


def test_template_with_native_tools_gets_them_as_variables():
    tok = _TemplateTokenizer(QWEN_LIKE)
    history = ASK + [{"role": "assistant", "content": "", "reasoning_content": "r",
                      "tool_calls": [{"id": "c", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "content": "sunny", "tool_call_id": "c"}]
    plan = build_chat_prompt(tok, history, TOOLS, "auto")
    assert plan.text.startswith("TOOLS:get_weather;get_time;") and "<tools>" not in plan.text
    assert "<think>r</think>[call get_weather Paris]" in plan.text  # arguments given as a mapping
    assert "<tool>sunny</tool>" in plan.text  # the template knows the tool role
    assert plan.start_in_reasoning  # the generation prompt opened <think>


# ------------------------------------------------------------------ metrics, errors, CLI helpers
def test_metrics_text_format():
    m = Metrics("smollm2")
    m.ttft.observe(0.03)
    m.ttft.observe(3.0)
    m.finished["stop"] += 2
    text = m.render(running=1, waiting=2, expert_stats=[{"hits": 5, "hit_rate": 0.5, "by_layer": {0: 3}}])
    assert 'vllm:num_requests_running{model_name="smollm2"} 1' in text
    assert 'vllm:num_requests_waiting{model_name="smollm2"} 2' in text
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="smollm2",le="0.04"} 1' in text
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="smollm2",le="+Inf"} 2' in text
    assert 'vllm:request_success_total{model_name="smollm2",finished_reason="stop"} 2' in text
    assert 'moemesh_expert_hits{model_name="smollm2",provider="0"} 5' in text
    assert 'moemesh_expert_hit_rate{model_name="smollm2",provider="0"} 0.5' in text
    assert 'moemesh_expert_by_layer{model_name="smollm2",provider="0",key="0"} 3' in text


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_validation_errors_name_the_field(body, param):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate(body)
    errors = [{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()]
    err = validation_error(RequestValidationError(errors))
    assert err.status == 400 and err.param == param and param.split("[")[0] in err.message
    assert err.openai_body()["error"]["type"] == "invalid_request_error"


def test_parse_size_and_curl_example():
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1024") == 1024
    example = curl_example("0.0.0.0", 9000, "smollm2", "k")
    assert "http://127.0.0.1:9000/v1/chat/completions" in example and "Bearer k" in example
