"""Claude Code (``claude -p ... --bare``) against ``moemesh serve``'s /v1/messages: it asks, the
model calls Claude Code's Read tool, Claude Code reads the file and sends the result back, and the
model answers from it; Claude Code prints the answer.

The checkpoint is scripted (tests/scripted_ckpt.py) on the very requests Claude Code makes, which
a first run against a recorder (tests/recorder.py) captures: its system prompt, its Read tool's
schema, its history with the tool result. Claude Code sends no temperature: the checkpoint's
generation_config.json recommends top_k 1, which makes the server decode greedily.

Slow, and skipped without the Claude Code binary: ``npm i --prefix ~/.cache/moemesh/claude-code
@anthropic-ai/claude-code`` (or MOEMESH_CLAUDE_CODE=/path/to/claude, or claude on PATH)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from moemesh.server.anthropic.convert import chat_messages, chat_tools
from moemesh.server.anthropic.schemas import MessagesRequest
from moemesh.server.launcher import ServerProcess
from recorder import Recorder
from scripted_ckpt import SCALE, Scripted, make_checkpoint
from test_server_clients import EOS, TEMPLATE, config_for, hermes_call

pytestmark = pytest.mark.slow
SECRET = "The secret word is banana."
QUESTION = "What does hello.txt say?"


def claude_binary() -> str | None:
    found = os.environ.get("MOEMESH_CLAUDE_CODE") or shutil.which("claude")
    local = Path.home() / ".cache/moemesh/claude-code/node_modules/.bin/claude"
    return found or (str(local) if local.exists() else None)


def run_claude(binary: str, base_url: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "none", "HOME": str(home),
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}
    return subprocess.run([binary, "-p", QUESTION, "--bare", "--system-prompt", "You are a test model.",
                           "--tools", "Read", "--model", "scripted", "--max-turns", "3"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def event(kind: str, body: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n"


def message_stream(block: dict, delta: dict, stop: str) -> str:
    """An Anthropic message stream of one content block (what the recorder answers)."""
    start = {"id": "msg_rec", "type": "message", "role": "assistant", "model": "scripted", "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 0}}
    return (event("message_start", {"message": start}) + event("content_block_start", {"index": 0, "content_block": block})
            + event("content_block_delta", {"index": 0, "delta": delta}) + event("content_block_stop", {"index": 0})
            + event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": 1}}) + event("message_stop", {}))


def as_chat(body: dict) -> dict:
    """An Anthropic request as the chat body it renders like (the server's own conversion)."""
    req = MessagesRequest.model_validate(body)
    return {"messages": chat_messages(req), "tools": chat_tools(req) or []}


def test_claude_code_reads_a_file_through_a_tool_call(tmp_path):
    binary = claude_binary()
    if binary is None:
        pytest.skip("Claude Code is not installed (npm i --prefix ~/.cache/moemesh/claude-code @anthropic-ai/claude-code)")
    work, home, ckpt = tmp_path / "work", tmp_path / "home", tmp_path / "ckpt"
    for d in (work, home, ckpt):
        d.mkdir()
    (work / "hello.txt").write_text(SECRET + "\n")
    args = {"file_path": str(work / "hello.txt")}
    replies = [message_stream({"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}},
                              {"type": "input_json_delta", "partial_json": json.dumps(args)}, "tool_use"),
               message_stream({"type": "text", "text": ""}, {"type": "text_delta", "text": SECRET}, "end_turn")]
    with Recorder(replies) as rec:
        recorded = run_claude(binary, rec.base_url, work, home)
    assert recorded.returncode == 0 and recorded.stdout.strip() == SECRET, recorded.stderr[-2000:]
    first, second = rec.bodies[:2]  # a retried request (if any) repeats the first
    assert json.dumps(second).count("banana") == 1  # the tool result went back
    scripts = [Scripted(as_chat(first), hermes_call("Read", args) + EOS), Scripted(as_chat(second), SECRET + EOS)]
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    margin = make_checkpoint(ckpt, config_for, scripts, special=[EOS, "<|im_start|>"],
                             plain=["<tool_call>", "</tool_call>"], eos=[EOS])
    assert margin > SCALE / 2
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1}))
    with ServerProcess(str(ckpt), "--threads", "1", "--quant", "none", "--served-model-name", "scripted") as srv:
        real = run_claude(binary, srv.base_url, work, home)
    assert real.returncode == 0, real.stderr[-2000:]
    assert real.stdout.strip() == SECRET
