"""Property-based fuzzing of every HTTP endpoint from the served OpenAPI document (schemathesis).

Cases are generated from /openapi.json, valid ones (positive) and invalid ones (negative), for the
OpenAI, vLLM and Anthropic surfaces, and sent to a live ``moemesh serve`` of a tiny random MoE
(SmolLM2's tokenizer and chat template, 4 layers of width 32, a 128-token context: generation is
short and cheap, so the cases test the server, not the model's speed). Every answer must: not be a 5xx; have a status and
content type the document lists; match the documented body (errors included: the API's error
body); reject invalid data with a 4xx; come back within the request timeout (no hang). The default
run is bounded (well under a minute here); the slow one runs many more cases and writes the counts
to bench/results/api_fuzz.{json,md}.

Not checked: "valid data is accepted" (schemathesis' positive_data_acceptance). Some rules span
fields or depend on the request's text, which a JSON schema cannot say: tool_choice needs tools, a
prompt must fit the context window, top_logprobs needs logprobs: those are 400s for valid-looking
bodies, and correct ones.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from moemesh.benchkit.results import write_results  # noqa: E402
from moemesh.server.launcher import ServerProcess  # noqa: E402

KEY = "fuzz-key"
NAME = "tiny-moe"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
EXAMPLES_SLOW = 200  # per operation and mode


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """A 4-layer tiny qwen3_moe (8 experts, top-2) with SmolLM2's tokenizer and chat template."""
    from transformers import Qwen3MoeConfig

    from moemesh.loading.loader import load_model
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("fuzz-moe")
    tok = load_model("smollm2").tokenizer
    cfg = Qwen3MoeConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=True)
    make_checkpoint(cfg, root, seed=7)
    tok.backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    with ServerProcess(str(root), "--api-key", KEY, "--threads", "1", "--quant", "none", "--ctx", "128",
                       "--served-model-name", NAME, "--max-batch", "4") as server:
        yield server


def fuzz(server: ServerProcess, examples: int) -> dict[str, Counter]:
    """Run ``examples`` positive and ``examples`` negative cases per operation; raises on the first
    failing check (hypothesis shrinks it first). Returns per operation: cases by mode and by status."""
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    counts: dict[str, Counter] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        seen = counts.setdefault(operation.label, Counter())
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                cases(operation, mode, examples, seen)()
            except Unsatisfiable:  # nothing to make invalid (GET /health has no parameters)
                assert mode is GenerationMode.NEGATIVE and not seen[mode.value]
    assert server.get_json("/health")["status"] == "ok"  # still serving
    return counts


def cases(operation, mode: GenerationMode, examples: int, seen: Counter):
    """The hypothesis test of one operation in one mode; counts what it sent and got in ``seen``."""
    auth = {"Authorization": f"Bearer {KEY}"}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        t0 = time.monotonic()
        response = case.call_and_validate(headers=auth, checks=CHECKS, timeout=60)
        assert time.monotonic() - t0 < 60  # no hang
        seen[mode.value] += 1
        seen[response.status_code] += 1

    return run


def test_every_endpoint_survives_schema_fuzzing(fuzz_server):
    counts = fuzz(fuzz_server, examples=10)
    assert len(counts) == 17  # every operation of the document was fuzzed (OpenAI, vLLM, Anthropic, Responses, Ollama)
    assert all(c["positive"] + c["negative"] > 0 for c in counts.values()), counts


@pytest.mark.slow
def test_every_endpoint_survives_long_schema_fuzzing(fuzz_server):
    t0 = time.monotonic()
    counts = fuzz(fuzz_server, examples=EXAMPLES_SLOW)
    seconds = time.monotonic() - t0
    rows = {op: {"positive": c["positive"], "negative": c["negative"],
                 "statuses": {str(k): v for k, v in sorted(c.items(), key=str) if isinstance(k, int)}}
            for op, c in counts.items()}
    payload = {"seconds": round(seconds, 1), "tool": f"schemathesis {schemathesis.__version__}",
               "examples_per_operation_and_mode": EXAMPLES_SLOW, "operations": rows,
               "checks": [c.__name__ for c in CHECKS], "failures": 0}
    lines = ["| operation | positive cases | negative cases | answers by status |", "|---|---|---|---|"]
    for op, row in rows.items():
        statuses = ", ".join(f"{k}: {v}" for k, v in row["statuses"].items())
        lines.append(f"| {op} | {row['positive']} | {row['negative']} | {statuses} |")
    write_results(RESULTS, "api_fuzz", payload, "\n".join(lines) + "\n",
                  ["-m", "pytest", "-m", "slow", "tests/test_server_fuzz.py"])
