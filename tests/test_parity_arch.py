"""Our forward vs transformers' on tiny random checkpoints of every architecture (fp32)."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from tiny import V, configs

NAMES = list(configs())


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_match_transformers(tiny_checkpoints, name):
    hf, d = tiny_checkpoints[name]
    ours = load_model(str(d), "fp32").model
    ids = prompt(1, 17)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [T, V]
    cache = ours.new_cache()
    cache.add_sequence(0)
    got = ours(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_greedy_32_tokens_match_transformers(tiny_checkpoints, name):
    hf, d = tiny_checkpoints[name]
    ids = prompt(2, 9)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    engine = Engine(load_model(str(d), "fp32").model)
    (seq,) = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=32))
    assert seq.output_ids == ref


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3_moe-norm", "qwen2_moe", "mixtral", "olmoe-gqa-norm"])
def test_batch_of_three_equals_each_alone(tiny_checkpoints, name):
    _, d = tiny_checkpoints[name]
    model = load_model(str(d), "fp32").model
    prompts = [prompt(10, 5), prompt(11, 13), prompt(12, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    alone = [Engine(model).generate([p], params)[0].output_ids for p in prompts]
    together = [s.output_ids for s in Engine(model).generate(prompts, params)]
    assert together == alone


def test_mixed_prefill_and_decode_logits_match(tiny_checkpoints):
    """One forward with a decoding sequence and a prefilling one equals separate forwards."""
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    model = load_model(str(d), "fp32").model
    a, b = prompt(20, 7), prompt(21, 4)
    cache = model.new_cache()
    for sid in (0, 1):
        cache.add_sequence(sid)
    model(torch.tensor(a), torch.arange(7), cache, BatchLayout([0], [7]))
    mixed = model(torch.tensor([3] + b), torch.tensor([7, 0, 1, 2, 3]), cache, BatchLayout([0, 1], [1, 4]))
    solo = model.new_cache()
    solo.add_sequence(0)
    model(torch.tensor(a), torch.arange(7), solo, BatchLayout([0], [7]))
    ref_a = model(torch.tensor([3]), torch.tensor([7]), solo, BatchLayout([0], [1]))
    solo.add_sequence(1)
    ref_b = model(torch.tensor(b), torch.arange(4), solo, BatchLayout([1], [4]))
    torch.testing.assert_close(mixed, torch.cat([ref_a, ref_b]), atol=1e-5, rtol=1e-5)
