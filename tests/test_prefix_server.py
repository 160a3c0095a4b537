"""The prefix cache through `moemesh serve` (the shared smollm2 server of the server tests): two
chats with one long system prompt; the second restores it, and /metrics counts it."""
from __future__ import annotations

import openai

from test_server_openai import KEY, metric, shared_server, wait_idle

SYSTEM = ("You are a careful assistant for a team of software engineers. Answer briefly, cite the file you "
          "read, never invent an API, and say so when you are unsure. " * 4)


def test_shared_system_prompt_is_restored_and_counted(request):
    server = shared_server(request.config, "main")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert metric(server, "moemesh_kv_bytes_per_token") == 30 * 2 * 3 * 64 * 4  # SmolLM2: fp32 K and V
    assert metric(server, "moemesh_prefix_cache_capacity_bytes") > 0
    answers = []
    for question in ("What is a mutex?", "What is a semaphore?"):
        wait_idle(server, 60)
        queries, hits = metric(server, "vllm:prefix_cache_queries_total"), metric(server, "vllm:prefix_cache_hits_total")
        r = client.chat.completions.create(model="smollm2", max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        answers.append(r.choices[0].message.content)
        asked = metric(server, "vllm:prefix_cache_queries_total") - queries
        assert asked == r.usage.prompt_tokens
        answers.append(metric(server, "vllm:prefix_cache_hits_total") - hits)
    assert answers[3] >= 96  # the system prompt (~130 tokens) minus the rounding to 32-token blocks
    assert metric(server, "moemesh_prefix_cache_blocks") >= 3
