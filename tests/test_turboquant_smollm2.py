"""TurboQuant on a real model: SmolLM2-135M perplexity on tests/data/kv_eval_essay.txt (an
original essay written for this suite), teacher-forced in chunks so most attention reads coded
history. The full sweep is slow; bench/kv_quality.py records its numbers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.benchkit.kv_quality import agreement, greedy, perplexity, teacher_forced, token_nll
from moemesh.loading.loader import load_model

TEXT = Path(__file__).parent / "data" / "kv_eval_essay.txt"


@pytest.fixture(scope="module")
def smollm2():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_turboquant_cache.one_thread
    loaded = load_model("smollm2", "fp32")
    yield loaded.model, loaded.tokenizer.encode(TEXT.read_text())
    torch.set_num_threads(n)


def test_essay_is_long_enough(smollm2):
    assert len(smollm2[1]) >= 2000


def test_short_span_perplexity(smollm2):
    """384 tokens in chunks of 96: later chunks attend mostly to coded history (window 32).
    Measured on this span: dense 31.14, 3.5 bits +0.2%, 2.5 bits +3.6%; the bound is looser
    than the goal on the full essay (slow test below)."""
    model, ids = smollm2
    ids = ids[:384]
    dense = perplexity(token_nll(model, ids, "dense", chunk=96))
    tq = perplexity(token_nll(model, ids, "turboquant:3.5", chunk=96))
    assert tq / dense < 1.03, (dense, tq)


@pytest.fixture(scope="module")
def dense_full(smollm2):
    model, ids = smollm2
    return teacher_forced(model, ids, "dense", chunk=256)  # (nll, top-1) over the whole essay


@pytest.mark.slow
@pytest.mark.parametrize("bits,goal", [(4, 1.01), (3.5, 1.01), (3, 1.03), (2.5, 1.05)])
def test_full_essay_perplexity_goals(smollm2, dense_full, bits, goal):
    """The issue's goals: at most +1% at 3.5 bits, +5% at 2.5 bits (chunks of 256, window 32)."""
    model, ids = smollm2
    dense = perplexity(dense_full[0])
    tq = perplexity(token_nll(model, ids, f"turboquant:{bits}", chunk=256))
    assert tq / dense <= goal, (dense, tq)


@pytest.mark.slow
def test_top1_predictions_agree_with_dense(smollm2, dense_full):
    """Teacher-forced top-1 next-token predictions over the whole essay: measured 94.6% equal to
    dense's at 3.5 bits (96.9% at 4). Free-running greedy text is reported by bench/kv_quality.py
    instead: one near-tie (we saw a dense top-2 margin of 0.012 logits) flips it and the texts drift."""
    model, ids = smollm2
    _, got = teacher_forced(model, ids, "turboquant:3.5", chunk=256)
    assert (got == dense_full[1]).double().mean().item() >= 0.92


@pytest.mark.slow
def test_greedy_continuation_runs_and_starts_like_dense(smollm2):
    model, ids = smollm2
    ref = greedy(model, ids[:1536], 16, "dense")
    got = greedy(model, ids[:1536], 16, "turboquant:4")
    assert len(got) == 16 and agreement(ref, got)[0] >= 4
