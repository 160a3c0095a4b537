"""A lazy-expert MoE model behind the HTTP server: requests complete and /metrics shows the cache."""
from __future__ import annotations

import json
import urllib.request

import pytest
from transformers import Qwen3MoeConfig

from moemesh.loading.convert import convert
from moemesh.loading.loader import load_model
from moemesh.server.launcher import ServerProcess
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def moe_store(tmp_path_factory):
    """A tiny random qwen3_moe with SmolLM2's tokenizer and chat template (same vocab size)."""
    root = tmp_path_factory.mktemp("moe-served")
    tok = load_model("smollm2").tokenizer
    cfg = Qwen3MoeConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=16, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=True)
    make_checkpoint(cfg, root / "hf")
    tok.backend.save(str(root / "hf" / "tokenizer.json"))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return convert(root / "hf", root / "store", "int4", progress=False)


def test_lazy_moe_served_with_cache_metrics(moe_store):
    server = ServerProcess(str(moe_store), "--ram", "600M", "--threads", "1").start()
    try:
        body = json.dumps({"model": moe_store.name, "max_tokens": 12, "temperature": 0,
                           "messages": [{"role": "user", "content": "Hello there"}]}).encode()
        req = urllib.request.Request(server.base_url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.load(r)
        assert reply["usage"]["completion_tokens"] > 0
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        lines = {ln.split("{")[0].split()[0]: float(ln.split()[-1]) for ln in metrics.splitlines()
                 if ln.startswith("moemesh_expert_")}
        assert lines.get("moemesh_expert_misses", 0) > 0, metrics
        assert lines.get("moemesh_expert_cache_slots", 0) > 0
    finally:
        server.stop()


def test_serve_with_turboquant_kv_answers():
    """The server's engine runs on a TurboQuant cache: concurrent requests complete, Paris survives."""
    from concurrent.futures import ThreadPoolExecutor

    server = ServerProcess("smollm2", "--kv", "turboquant:3.5", "--threads", "1").start()
    try:
        def ask(question: str) -> str:
            body = json.dumps({"model": "smollm2", "max_tokens": 24, "temperature": 0,
                               "messages": [{"role": "user", "content": question}]}).encode()
            req = urllib.request.Request(server.base_url + "/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, ["What is the capital of France?", "Name a color.", "Say hello."]))
        assert "Paris" in answers[0] and all(answers)
    finally:
        server.stop()
