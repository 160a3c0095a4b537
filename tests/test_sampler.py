"""Sampler and SamplingParams: filters, penalties, seeding, and distribution checks."""

from __future__ import annotations

import math

import pytest
import torch

from moemesh.engine.sampler import Sampler, SampleResult, apply_penalties, make_generator, truncate
from moemesh.engine.sampling_params import SamplingParams

V = 32


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * 3  # [B, V]


def _run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int | None] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SampleResult:
    b = logits.shape[0]
    seeds = seeds if seeds is not None else [0] * b
    return Sampler().sample(
        logits,
        params,
        prompts if prompts is not None else [[] for _ in range(b)],
        outputs if outputs is not None else [[] for _ in range(b)],
        [make_generator(s) for s in seeds],
    )


def _draws(logits: torch.Tensor, p: SamplingParams, n: int, seed: int) -> list[int]:
    """n successive single-row draws from one generator, like decode steps."""
    g = make_generator(seed)
    s = Sampler()
    return [s.sample(logits, [p], [[]], [[]], [g]).token_ids[0] for _ in range(n)]


def test_greedy_is_argmax_and_ties_go_low() -> None:
    logits = _logits(4)
    res = _run(logits, [SamplingParams(temperature=0)] * 4)
    assert res.token_ids == logits.argmax(-1).tolist()
    tied = torch.zeros(1, V)
    tied[0, [5, 9, 20]] = 2.0
    assert _run(tied, [SamplingParams(temperature=0)]).token_ids == [5]


def test_logprob_of_chosen_token_ignores_temperature() -> None:
    logits = _logits(2)
    res = _run(logits, [SamplingParams(temperature=0), SamplingParams(temperature=0.3, top_k=3)])
    ref = torch.log_softmax(logits, -1)
    for row, tok in enumerate(res.token_ids):
        assert res.logprobs[row] == pytest.approx(ref[row, tok].item(), abs=1e-6)
    assert res.top_logprobs is None


def test_top_logprobs_per_row() -> None:
    logits = _logits(3)
    params = [SamplingParams(logprobs=3), SamplingParams(), SamplingParams(logprobs=0)]
    res = _run(logits, params)
    assert res.top_logprobs is not None
    assert res.top_logprobs[1] == [] and res.top_logprobs[2] == []
    ref_vals, ref_ids = torch.log_softmax(logits[0], -1).topk(3)
    assert [t for t, _ in res.top_logprobs[0]] == ref_ids.tolist()
    for (_, lp), ref in zip(res.top_logprobs[0], ref_vals.tolist()):
        assert lp == pytest.approx(ref, abs=1e-6)


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = torch.zeros(1, V)  # uniform: every draw is maximally random
    p = SamplingParams(temperature=1.0)
    a, b, c = _draws(logits, p, 50, 7), _draws(logits, p, 50, 7), _draws(logits, p, 50, 8)
    assert a == b
    assert a != c  # equal by chance with probability 32**-50


def test_unseeded_generators_differ() -> None:
    logits = torch.zeros(1, V)
    p = SamplingParams()
    assert _draws(logits, p, 50, None) != _draws(logits, p, 50, None)


def test_batch_rows_match_solo_runs() -> None:
    logits = _logits(3, seed=1)
    params = [
        SamplingParams(temperature=0.7, top_k=5, seed=1),
        SamplingParams(temperature=1.3, top_p=0.8, repetition_penalty=1.2, seed=2),
        SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2),
    ]
    prompts = [[1, 2], [3, 4, 5], [6]]
    outputs = [[7], [8, 8, 3], [int(logits[2].argmax()), 9]]
    gens = [make_generator(p.seed) for p in params]
    batch_res = [Sampler().sample(logits, params, prompts, outputs, gens) for _ in range(20)]
    for i, p in enumerate(params):
        g = make_generator(p.seed)
        for step in range(20):
            solo = Sampler().sample(logits[i : i + 1], [p], [prompts[i]], [outputs[i]], [g])
            assert solo.token_ids[0] == batch_res[step].token_ids[i]
            assert solo.logprobs[0] == batch_res[step].logprobs[i]
    assert batch_res[0].top_logprobs is not None and len(batch_res[0].top_logprobs[2]) == 2


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.5, min_p=1.0),
    ],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_filters_collapse_to_greedy(params: SamplingParams) -> None:
    logits = _logits(8, seed=2)
    greedy = logits.argmax(-1).tolist()
    for seed in range(5):
        assert _run(logits, [params] * 8, seeds=[seed] * 8).token_ids == greedy


def test_truncate_sets() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])  # [1, 5]
    logits = probs.log()

    def kept(p: SamplingParams) -> list[int]:
        x = logits.clone()
        truncate(x, [p])
        return torch.isfinite(x[0]).nonzero().flatten().tolist()

    assert kept(SamplingParams(top_k=2)) == [0, 1]
    # Margins around the exact boundaries: fp32 log/exp makes equality a coin toss.
    assert kept(SamplingParams(top_p=0.79)) == [0, 1]  # 0.5 + 0.3 reaches 0.79
    assert kept(SamplingParams(top_p=0.81)) == [0, 1, 2]
    assert kept(SamplingParams(top_p=0.49)) == [0]
    assert kept(SamplingParams(top_p=0.51)) == [0, 1]
    assert kept(SamplingParams(min_p=0.21)) == [0, 1]  # 0.1 < 0.21 * 0.5
    assert kept(SamplingParams(min_p=0.19)) == [0, 1, 2]
    # top_p applies to the renormalised top_k set: 0.5/0.9 < 0.6 <= 0.8/0.9.
    assert kept(SamplingParams(top_k=3, top_p=0.6)) == [0, 1]
    assert kept(SamplingParams()) == [0, 1, 2, 3, 4]


def test_repetition_penalty_positive_and_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])  # [1, 5]
    p = SamplingParams(repetition_penalty=2.0)
    x = logits.clone()
    apply_penalties(x, [p], [[0, 1]], [[1, 3]])  # token 1 twice: penalised once
    assert x.tolist() == [[1.0, -4.0, 3.0, -2.0, 0.5]]


def test_presence_and_frequency_penalties() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # [1, 4]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    x = logits.clone()
    # Prompt tokens do not count; token 1 generated 3 times, token 2 once.
    apply_penalties(x, [p], [[0, 0, 3]], [[1, 2, 1, 1]])
    expected = [1.0, 1.0 - 0.5 - 0.75, 1.0 - 0.5 - 0.25, 1.0]
    assert x[0].tolist() == pytest.approx(expected)


def test_negative_presence_penalty_and_batch_isolation() -> None:
    logits = torch.zeros(2, 4)
    params = [SamplingParams(presence_penalty=-1.0), SamplingParams(repetition_penalty=1.5)]
    x = logits.clone() + torch.tensor([[0.0], [1.0]])
    apply_penalties(x, params, [[], [0]], [[2, 2], [3]])
    assert x[0].tolist() == [0.0, 0.0, 1.0, 0.0]  # presence only, no repetition
    assert x[1].tolist() == pytest.approx([1 / 1.5, 1.0, 1.0, 1 / 1.5])


def test_penalties_feed_greedy_and_logprobs() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    res = _run(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], outputs=[[0]])
    assert res.token_ids == [1]  # 3.0 / 2 = 1.5 < 2.9
    ref = torch.log_softmax(torch.tensor([1.5, 2.9, 0.0]), -1)[1].item()
    assert res.logprobs[0] == pytest.approx(ref, abs=1e-6)


def test_caller_logits_untouched() -> None:
    logits = _logits(1)
    before = logits.clone()
    _run(logits, [SamplingParams(repetition_penalty=1.3, frequency_penalty=1.0)], outputs=[[1, 2]])
    assert torch.equal(logits, before)


def _histogram(logits: torch.Tensor, p: SamplingParams, n: int) -> torch.Tensor:
    """Empirical distribution of n draws: one call over n identical rows sharing a generator."""
    g = make_generator(1234)
    rows = logits.expand(n, -1).contiguous()  # [n, V]
    res = Sampler().sample(rows, [p] * n, [[]] * n, [[]] * n, [g] * n)
    return torch.bincount(torch.tensor(res.token_ids), minlength=logits.shape[-1]).float() / n


def test_empirical_distribution_matches_softmax() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    freq = _histogram(logits, SamplingParams(temperature=1.0), 20_000)
    expected = torch.softmax(logits[0], -1)
    assert (freq - expected).abs().max().item() < 0.015
    # Chi-square, 5 dof: the 99.9% quantile is 20.5.
    n = 20_000
    chi2 = (((freq - expected) * n) ** 2 / (expected * n)).sum().item()
    assert chi2 < 20.5


def test_temperature_and_top_p_mass() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    t = 0.5
    freq = _histogram(logits, SamplingParams(temperature=t, top_p=0.9), 20_000)
    probs = torch.softmax(logits[0] / t, -1)
    order = probs.argsort(descending=True)
    # Smallest prefix of the sorted distribution whose mass reaches 0.9.
    cum = probs[order].cumsum(0)
    n_keep = int((cum < 0.9).sum().item()) + 1
    kept = order[:n_keep]
    assert probs[kept].sum() >= 0.9
    dropped = torch.ones(6, dtype=torch.bool)
    dropped[kept] = False
    assert freq[dropped].sum().item() == 0.0  # no mass outside the nucleus
    expected = torch.zeros(6)
    expected[kept] = probs[kept] / probs[kept].sum()
    assert (freq - expected).abs().max().item() < 0.015


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", -3.0),
        ("max_tokens", 0),
        ("logprobs", -1),
        ("logprobs", 21),
    ],
)
def test_validate_rejects_bad_field(field: str, value: float) -> None:
    p = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        p.validate()


def test_validate_accepts_defaults_and_edges() -> None:
    SamplingParams().validate()
    SamplingParams(
        temperature=0, top_p=1.0, min_p=1.0, top_k=0, presence_penalty=-2, frequency_penalty=2,
        max_tokens=1, logprobs=20, stop=["\n"], seed=3,
    ).validate()
