"""DeepSeek tool-call parsing (V3/R1 fenced form and V3.1 form), whole and streamed."""
from __future__ import annotations

import json

import pytest

from moemesh.tokenizer.formats.deepseek_tools import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    DeepSeekToolStream,
    make_tool_stream,
    parse_deepseek_tool_calls,
)
from moemesh.tokenizer.formats.reasoning import split_reasoning
from moemesh.tokenizer.formats.tool_parser import ToolCallStream

V3 = (f"Let me check.\n\n{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n"
      f'{{"city": "Paris", "unit": "c"}}\n```{CALL_END}\n{CALL_BEGIN}function{SEP}get_time\n```json\n'
      f'{{"tz": "CET"}}\n```{CALL_END}{CALLS_END}')
V31 = f'{CALLS_BEGIN}{CALL_BEGIN}search{SEP}{{"q": "a \\"quoted\\" {SEP}"}}{CALL_END}{CALLS_END}'


def stream_in_pieces(text: str, size: int) -> tuple[str, list]:
    s = DeepSeekToolStream()
    content, deltas = "", []
    for i in range(0, len(text), size):
        c, d = s.feed(text[i : i + size])
        content, deltas = content + c, deltas + d
    c, d = s.finish()
    return content + c, s.calls, deltas + d


def test_v3_fenced_calls():
    content, calls = parse_deepseek_tool_calls(V3)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "c"}
    assert json.loads(calls[1].arguments) == {"tz": "CET"}
    assert all(c.valid for c in calls) and calls[0].id != calls[1].id


def test_v31_calls_keep_separators_inside_strings():
    content, calls = parse_deepseek_tool_calls(V31)
    assert content == "" and len(calls) == 1
    assert calls[0].name == "search" and json.loads(calls[0].arguments) == {"q": f'a "quoted" {SEP}'}


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streaming_any_split_equals_whole(size):
    for text in (V3, V31, "plain text, no calls <｜tool", "x " + V3 + "\ntrailing"):
        whole_content, whole_calls = parse_deepseek_tool_calls(text)
        content, calls, deltas = stream_in_pieces(text, size)
        assert content == whole_content
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
        firsts = [d for d in deltas if d.id is not None]
        assert [d.name for d in firsts] == [c.name for c in calls]  # each call announced once
        for i, call in enumerate(calls):
            assert "".join(d.arguments for d in deltas if d.index == i) == call.arguments


def test_partial_tag_is_held_back_not_emitted():
    s = DeepSeekToolStream()
    content, _ = s.feed("hello <｜tool▁ca")
    assert content == "hello"  # the tag might be starting; the space waits with it
    content, _ = s.feed("t is a cat")
    assert content == " <｜tool▁cat is a cat"


def test_text_after_the_block_is_content():
    content, calls = parse_deepseek_tool_calls(V31 + "\n\nDone.")
    assert content == "Done." and len(calls) == 1


def test_invalid_call_body_comes_back_as_content():
    bad = f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n{{not json\n```{CALL_END}{CALLS_END}"
    s = DeepSeekToolStream()
    c1, _ = s.feed(bad)
    c2, _ = s.finish()
    assert s.calls == [] and len(s.invalid_bodies) == 1
    assert "{not json" in c1 + c2


def test_eos_before_the_end_tags_still_yields_the_call():
    cut = V31[: V31.index(CALL_END)]  # generation stopped right after the arguments
    content, calls = parse_deepseek_tool_calls(cut)
    assert content == "" and len(calls) == 1 and calls[0].valid


def test_reasoning_then_calls_as_deepseek_r1_writes_them():
    out = "The user wants weather.\n</think>\n\n" + V3  # the template opened <think> already
    reasoning, rest = split_reasoning(out, start_inside=True)
    assert reasoning == "The user wants weather.\n"
    content, calls = parse_deepseek_tool_calls(rest)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]


def test_parser_chosen_by_chat_template():
    assert isinstance(make_tool_stream("{% if tools %}" + CALLS_BEGIN + "{% endif %}", "call_"), DeepSeekToolStream)
    assert isinstance(make_tool_stream("<tool_call>{{ x }}</tool_call>", "call_"), ToolCallStream)
    assert isinstance(make_tool_stream(None, "call_"), ToolCallStream)
