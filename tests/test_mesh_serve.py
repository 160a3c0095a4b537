"""``moemesh mesh serve`` end to end, as child processes on loopback:

- discovery: a local Nostr relay; the first node lists its mesh (--publish), two more find it
  with --auto and join (one picks its experts with --experts auto), and the mesh answers a chat
  request; ``mesh invite`` with no options prints the running node's invite;
- HTTP: the OpenAI SDK streams a chat completion through a 2-stage pipeline's API node, and the
  text equals what a one-process ``moemesh serve`` streams for the same request.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest

from moemesh.mesh.discovery.invite import Invite
from moemesh.mesh.launcher import MeshProcess
from moemesh.server.launcher import ServerProcess

SECRET = "serve-secret"
COMMON = ("--quant", "fp32", "--threads", "1", "--heartbeat", "1", "--call-timeout", "10")
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
D, I, LAYERS = 32, 24, 4  # hidden, expert width, layers of the tiny model


@pytest.fixture(scope="module")
def chat_moe(tmp_path_factory):
    """A 4-layer tiny qwen3_moe (8 experts, top-2) with SmolLM2's tokenizer and chat template."""
    from transformers import Qwen3MoeConfig

    from moemesh.loading.loader import load_model
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("mesh-chat-moe")
    tok = load_model("smollm2").tokenizer
    cfg = Qwen3MoeConfig(vocab_size=tok.vocab_size, hidden_size=D, intermediate_size=64, moe_intermediate_size=I,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=True)
    make_checkpoint(cfg, root, seed=7)
    tok.backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return str(root)


def chat(url: str, max_tokens: int = 8) -> dict:
    body = json.dumps({"max_tokens": max_tokens, "temperature": 0, "messages": HELLO}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def test_nodes_find_each_other_on_nostr_and_serve(chat_moe, fresh_relay):
    relay = ("--nostr-relay", fresh_relay)
    first = MeshProcess(chat_moe, "--no-api", "--experts", "0:4", *relay, "--publish", "--mesh-name", "disc",
                        "--secret", SECRET, "--listing-interval", "2", *COMMON).launch()
    nodes = [first]
    try:
        first.wait_ready(60)
        one_expert = 3 * I * D * 4 * LAYERS  # fp32 gate, up, down of one expert id in every layer
        second = MeshProcess(chat_moe, "--no-api", "--auto", *relay, "--experts", "auto",
                             "--expert-ram", str(4 * one_expert + 100), *COMMON).launch()
        nodes.append(second)
        second.wait_ready(60)
        api = MeshProcess(chat_moe, "--auto", *relay, "--experts", "0:2", "--http-port", "0", *COMMON).launch()
        nodes.append(api)
        url = api.wait_http(60)
        assert "listing mesh 'disc'" in first.output() and "with its secret" in first.output()
        for node in (second, api):
            assert "joining mesh 'disc' found on Nostr" in node.output(), node.output()
        assert "experts 4:8 of 8" in second.output()  # auto took what the first node lacks
        reply = chat(url)
        assert reply["usage"]["completion_tokens"] > 0
        invite = subprocess.run([sys.executable, "-m", "moemesh.cli", "mesh", "invite"], capture_output=True,
                                text=True, timeout=60, env={**os.environ, "MOEMESH_HOME": api.home})
        assert invite.returncode == 0, invite.stderr
        inv = Invite.decode(invite.stdout.strip())
        assert inv.mesh_name == "disc" and inv.secret == SECRET and inv.addrs == [api.addr]
    finally:
        for node in nodes:
            node.stop()


def test_openai_stream_through_pipeline_matches_one_process(chat_moe):
    single = ServerProcess(chat_moe, "--quant", "fp32", "--threads", "1").launch()
    stage = MeshProcess(chat_moe, "--layers", "2:4", "--no-api", "--secret", SECRET, "--mesh-name", "http",
                        *COMMON).launch()
    api = None
    try:
        stage.wait_ready(60)
        api = MeshProcess(chat_moe, "--layers", "0:2", "--peer", stage.addr, "--secret", SECRET, "--mesh-name",
                          "http", "--http-port", "0", *COMMON).launch()
        mesh_url = api.wait_http(60)
        single.wait_ready(60)

        def stream(url: str) -> tuple[str, int]:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            text, usage = [], 0
            for chunk in client.chat.completions.create(model=Path(chat_moe).name, messages=HELLO, max_tokens=12, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return "".join(text), usage

        mesh_text, mesh_n = stream(mesh_url)
        single_text, single_n = stream(single.base_url)
        assert mesh_n == single_n > 0
        assert mesh_text == single_text and mesh_text
        with urllib.request.urlopen(f"{mesh_url}/metrics", timeout=10) as r:  # per-peer calls and bytes
            metrics = r.read().decode()
        peer = f'peer="{stage.peer_id}"'
        for name in ("moemesh_mesh_peer_calls_total", "moemesh_mesh_peer_bytes_sent_total",
                     "moemesh_mesh_peer_bytes_received_total", "moemesh_mesh_peer_call_seconds_total"):
            line = next(m for m in metrics.splitlines() if m.startswith(name + "{") and peer in m)
            assert float(line.rsplit(" ", 1)[1]) > 0, line
    finally:
        for p in (api, stage, single):
            if p is not None:
                p.stop()


def test_auto_with_nothing_listed_starts_a_new_mesh(fresh_relay, monkeypatch):
    import argparse

    from moemesh.commands.mesh_discovery import auto_discover

    monkeypatch.delenv("MOEMESH_MESH_SECRET", raising=False)
    args = argparse.Namespace(join=None, peer=[], mesh_name="fresh", secret=None, nostr_relay=[fresh_relay],
                              model="/models/Qwen3-30B-A3B/")
    assert auto_discover(args) is False
    assert args.join is None and len(args.secret) >= 32  # a fresh random secret for the new mesh
    args.peer = ["/ip4/127.0.0.1/tcp/1"]
    with pytest.raises(Exception, match="leave out --join and --peer"):
        auto_discover(args)
