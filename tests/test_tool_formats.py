"""GLM / MiniMax / Kimi tool-call parsers (tokenizer/formats/tool_formats.py): whole and streamed outputs give the
same calls, argument values typed by the tools' schemas, malformed blocks come back as content."""
from __future__ import annotations

import json

import pytest

from moemesh.tokenizer.formats import tool_formats as tf

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "string"},
    "detail": {"type": "object"}}}}}

GLM = ("Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
       "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>units</arg_key>\n<arg_value>42</arg_value>\n"
       "</tool_call>\n<tool_call>get_time</tool_call>")
GLM47 = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>New\nYork</arg_value></tool_call>"
MINIMAX = ('Checking.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
           '<parameter name="detail">{"wind": true}</parameter>\n</invoke>\n<invoke name="get_time">\n</invoke>\n'
           "</minimax:tool_call>")
KIMI = ("Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}'
        "<|tool_call_end|><|tool_calls_section_end|>")


def streamed(fmt: str, text: str, tools=None) -> tuple[str, list]:
    s = tf.make_stream(fmt, tools=tools)
    content, deltas = [], []
    for ch in text:  # one character at a time: every marker split everywhere
        c, d = s.feed(ch)
        content.append(c)
        deltas += d
    c, d = s.finish()
    return "".join(content) + c, s.calls


@pytest.mark.parametrize("fmt,text,content,calls", [
    ("glm", GLM, "Let me check.", [("get_weather", {"city": "Paris", "days": 3, "units": "42"}), ("get_time", {})]),
    ("glm", GLM47, "", [("get_weather", {"city": "New\nYork"})]),
    ("minimax", MINIMAX, "Checking.", [("get_weather", {"city": "Paris", "detail": {"wind": True}}), ("get_time", {})]),
    ("kimi", KIMI, "Sure.", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
])
def test_whole_and_streamed_agree(fmt, text, content, calls):
    for got_content, got_calls in (tf.parse_tool_calls(fmt, text, [WEATHER]), streamed(fmt, text, [WEATHER])):
        assert got_content == content
        assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
        assert all(c.valid for c in got_calls)


def test_schema_types_and_without_schema():
    _, calls = tf.parse_tool_calls("glm", GLM, None)  # no schema: JSON-looking values are read as JSON
    assert json.loads(calls[0].arguments)["units"] == 42
    _, calls = tf.parse_tool_calls("glm", GLM, [WEATHER])  # the schema says string: stays text
    assert json.loads(calls[0].arguments)["units"] == "42"


def test_kimi_keeps_its_call_ids():
    _, calls = tf.parse_tool_calls("kimi", KIMI)
    assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_time:1"]


@pytest.mark.parametrize("fmt,bad", [
    ("glm", "<tool_call>not a call <b>html</b></tool_call>"),
    ("minimax", "<minimax:tool_call>no invoke here</minimax:tool_call>"),
    ("kimi", "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{oops"
             "<|tool_call_end|><|tool_calls_section_end|>"),
])
def test_malformed_blocks_come_back_as_content(fmt, bad):
    content, calls = tf.parse_tool_calls(fmt, "A " + bad + " B")
    assert calls == [] and content == "A" + bad + "B"


def test_eos_inside_a_block_still_parses_or_returns_text():
    content, calls = tf.parse_tool_calls("glm", "x <tool_call>get_time")  # the model stopped before </tool_call>
    assert content == "x" and [c.name for c in calls] == ["get_time"]
    content, calls = tf.parse_tool_calls("minimax", "<minimax:tool_call>\n<invoke name=")
    assert calls == [] and content == "<minimax:tool_call>\n<invoke name="


def test_text_that_only_looks_like_a_marker_is_kept():
    text = "a < b and <tool_ are fine"
    assert streamed("glm", text) == (text, [])
    assert tf.parse_tool_calls("kimi", "<|tool_calls_section") == ("<|tool_calls_section", [])


def test_format_detection_and_forced_prefills():
    assert tf.format_of("{{ '<tool_call>' }}{{ '<arg_key>' }}") == "glm"
    assert tf.format_of("<tool_call>{{ tool | tojson }}</tool_call>") is None  # Hermes
    assert tf.format_of("<minimax:tool_call>") == "minimax" and tf.format_of("<|tool_calls_section_begin|>") == "kimi"
    for fmt in ("glm", "minimax", "kimi"):  # a forced head plus the model's continuation parses as the call
        continuation = {"glm": "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
                        "minimax": '<parameter name="city">Paris</parameter></invoke></minimax:tool_call>',
                        "kimi": '0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'}
        _, calls = tf.parse_tool_calls(fmt, tf.forced_prefill(fmt, "get_weather") + continuation[fmt], [WEATHER])
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_keep_markers_decoder():
    class Tok:  # special tokens 1, 2 (markers) and 3 (eos); 0 a word
        vocab = {0: "hi", 1: "<|tool_calls_section_begin|>", 2: "<|tool_calls_section_end|>", 3: "<eos>"}

        def token_to_id(self, t):
            return {v: k for k, v in self.vocab.items()}.get(t)

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i in (1, 2, 3)))

    dec = tf.KeepMarkers(Tok(), "kimi")
    assert dec.decode([0, 1, 0, 2, 3], skip_special_tokens=True) == "hi<|tool_calls_section_begin|>hi<|tool_calls_section_end|>"
