"""Harmony (gpt-oss) rendering and output-channel parsing, on strings."""
from __future__ import annotations

import json

from moemesh.tokenizer.formats.harmony import HarmonyStream, parse, render, render_tools

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Gets the current weather in the provided location.",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}}}}
LOCATION = {"type": "function", "function": {"name": "get_location", "description": "Gets the location of the user."}}

ANSWER = ("<|channel|>analysis<|message|>User asks 2+2. Simple.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.")
CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json"
        '<|message|>{"location":"San Francisco, CA"}')


def test_tools_render_as_typescript_namespace():
    assert render_tools([LOCATION, WEATHER]) == (
        "## functions\n\nnamespace functions {\n\n"
        "// Gets the location of the user.\ntype get_location = () => any;\n\n"
        "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
        "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
        'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
        "} // namespace functions")


def test_render_conversation_with_tool_round_trip():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in SF?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_current_weather", "arguments": '{"location": "SF"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'}]
    text = render(msgs, tools=[WEATHER], reasoning_effort="low")
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Reasoning: low" in text and "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n## functions" in text
    assert "<|start|>user<|message|>Weather in SF?<|end|>" in text
    assert ('<|start|>assistant to=functions.get_current_weather<|channel|>commentary json<|message|>'
            '{"location": "SF"}<|call|>') in text
    assert text.endswith('<|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>'
                         '{"temp": 20}<|end|><|start|>assistant')
    assert "<|start|>developer" not in render([{"role": "user", "content": "hi"}])


def test_parse_analysis_and_final():
    assert parse(ANSWER + "<|return|>")[:2] == ("User asks 2+2. Simple.", "2 + 2 = 4.")
    assert parse(ANSWER) == ("User asks 2+2. Simple.", "2 + 2 = 4.", [])  # engine ate <|return|>


def test_parse_tool_call_both_header_orders():
    for text in (CALL, CALL + "<|call|>",
                 '<|start|>assistant to=functions.get_current_weather<|channel|>commentary json<|message|>'
                 '{"location":"San Francisco, CA"}<|call|>'):
        reasoning, content, calls = parse(text)
        assert content == "" and len(calls) == 1
        assert calls[0].name == "get_current_weather" and calls[0].valid
        assert json.loads(calls[0].arguments) == {"location": "San Francisco, CA"}
    assert parse(CALL)[0] == "Need the weather."


def test_commentary_preamble_is_content():
    text = "<|channel|>commentary<|message|>Let me check.<|end|>" + CALL[CALL.index("<|start|>"):]
    reasoning, content, calls = parse(text)
    assert content == "Let me check." and [c.name for c in calls] == ["get_current_weather"]


def test_streaming_char_by_char_equals_whole():
    for text in (ANSWER + "<|return|>", CALL):
        stream = HarmonyStream()
        r, c, args = [], [], []
        for ch in text:
            r1, c1, d = stream.feed(ch)
            r.append(r1)
            c.append(c1)
            args += [x.arguments for x in d]
            assert "<|" not in r1 + c1 and "|>" not in r1 + c1
        r2, c2, d = stream.finish()
        whole = parse(text)
        assert ("".join(r) + r2, "".join(c) + c2) == whole[:2]
        assert "".join(args) + "".join(x.arguments for x in d) == "".join(x.arguments for x in whole[2])


# -- the server's Generation with a Harmony template (scripted tokens, no model) ---------------
SPECIAL = {"<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"}


class PieceTokenizer:
    """Token i is pieces[i]; special pieces vanish under skip_special_tokens, as in HF tokenizers."""

    chat_template = "{{ '<|start|>' }}...{{ '<|channel|>' }}"  # what uses_harmony looks for

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and self.pieces[i] in SPECIAL))


class ScriptedLoop:
    """Stands in for the engine thread: replays the script's tokens, the last one ending the turn."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def submit(self, handle) -> None:
        from moemesh.server.core.engine_loop import TokenEvent

        for i, t in enumerate(self.ids):
            last = i == len(self.ids) - 1
            handle.events.put_nowait(TokenEvent(t, finished=last, finish_reason="stop" if last else None))

    def abort(self, handle) -> None:
        pass


def generate(script: str, tool_mode=None):
    import asyncio
    import re

    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.server.core.generation import Generation, GenerationRequest
    from moemesh.server.core.metrics import Metrics

    pieces = [p for p in re.split(r"(<\|\w+\|>|\s)", script) if p]  # special tokens and words
    tok = PieceTokenizer(pieces)

    class Slot:
        def release(self) -> None:
            pass

    async def main():
        gen = Generation(GenerationRequest([0], SamplingParams(max_tokens=100), tool_mode=tool_mode),
                         ScriptedLoop(list(range(len(pieces)))), tok, Metrics("m"), Slot())
        gen.start()
        return await gen.run()

    return asyncio.run(main())


def test_generation_splits_harmony_channels():
    out = generate(ANSWER + "<|return|>")
    assert (out.reasoning, out.content, out.finish_reason) == ("User asks 2+2. Simple.", "2 + 2 = 4.", "stop")


def test_generation_reports_harmony_tool_calls():
    from moemesh.server.core.generation import ToolMode

    out = generate(CALL + "<|call|>", ToolMode("auto", frozenset({"get_current_weather"})))
    assert out.reasoning == "Need the weather." and out.content == ""
    assert out.finish_reason == "tool_calls" and [c.name for c in out.tool_calls] == ["get_current_weather"]
    assert json.loads(out.tool_calls[0].arguments) == {"location": "San Francisco, CA"}
