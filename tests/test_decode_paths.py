"""The eager decode's fast path (quant/decode_kernels.c: RMSNorm, rotary embedding, one-token attention,
MLA's int8 products, the greedy sampler) against its torch references on every architecture: the same
greedy tokens over a prefill and 16 decode steps, logits within float rounding."""
from __future__ import annotations

import pytest

from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.quant import decode_kernels as dk
from test_compiled_archs import ARCHS, SOURCES

needs_lib = pytest.mark.skipif(dk.load() is None, reason="no C compiler / decode kernels disabled")


@needs_lib
@pytest.mark.parametrize("arch", ARCHS, ids=[a[0] for a in ARCHS])
def test_fast_path_gives_the_reference_tokens(arch, tmp_path, monkeypatch):
    _, source, name, quant, overrides = arch
    make_configs, make_checkpoint = SOURCES[source]
    config = make_configs()[name]
    for key, value in overrides.items():
        setattr(config, key, value)
    make_checkpoint(config, tmp_path)
    model = load_model(str(tmp_path), quant).model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    fast = [s.output_ids for s in Engine(model).generate(prompts, params)]  # batched decode steps
    alone = [Engine(model).generate([p], params)[0].output_ids for p in prompts]  # one sequence: the one-call path
    monkeypatch.setattr(dk, "load", lambda: None)  # every step on its torch reference
    ref = [Engine(model).generate([p], params)[0].output_ids for p in prompts]
    assert fast == alone == ref
