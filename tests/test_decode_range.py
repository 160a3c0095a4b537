"""engine/decode_range.py: a mesh stage's share of layers decodes one token of one sequence through the
planned per-layer C calls, with the layers' forward's bits (a range in the middle of the model, its cache
numbered from the range's first layer), and stays out of the way for prefill and batches."""
from __future__ import annotations

import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.engine.decode_range import PlannedRange
from moemesh.loading.loader import load_model
from moemesh.mesh.pipeline.slice import StageLayers
from moemesh.quant import decode_kernels, int4_native

pytestmark = pytest.mark.skipif(decode_kernels.load() is None or int4_native.load_native() is None,
                                reason="no native kernels on this machine")


def run_range(stage: StageLayers, a: int, b: int, xs: torch.Tensor, steps: torch.Tensor, planned: bool,
              monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Prefill xs [T, D] through layers [a, b), then one row of ``steps`` [N, D] at a time."""
    with monkeypatch.context() as m:
        if not planned:
            m.setattr(PlannedRange, "takes", lambda *args: False)
        cache = stage.new_cache("dense", a, b)
        cache.add_sequence(7)
        t = xs.shape[0]
        outs = [stage.run(a, b, xs, torch.arange(t), cache, BatchLayout([7], [t]))]
        for i in range(steps.shape[0]):
            outs.append(stage.run(a, b, steps[i : i + 1], torch.tensor([t + i]), cache, BatchLayout([7], [1])))
        return outs


def test_a_middle_range_decodes_planned_with_the_modules_bits(monkeypatch):
    model = load_model("smollm2", "auto").model
    stage = StageLayers(model.args, dict(enumerate(model.layers)), 0, model.args.num_layers)
    assert stage.planned().takes(5, 17, torch.zeros(1, 1), BatchLayout([7], [1]), stage.new_cache("dense", 5, 17))
    g = torch.Generator().manual_seed(0)
    d = model.embed.shape[1]
    xs, steps = torch.randn(6, d, generator=g), torch.randn(20, d, generator=g)  # 26 tokens: the KV buffers grow
    got = run_range(stage, 5, 17, xs, steps, True, monkeypatch)
    assert [t is not None for t in stage.planned().tables.values()] == [True]  # the range as one C call
    want = run_range(stage, 5, 17, xs, steps, False, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    stage.planned().tables.clear()
    with monkeypatch.context() as m:  # and the per-layer calls (a range the one-call step does not cover)
        m.setattr("moemesh.engine.decode_range.StepTable.build", lambda *args: None)
        per_layer = run_range(stage, 5, 17, xs, steps, True, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(per_layer, want))
    assert not stage.planned().takes(5, 17, xs, BatchLayout([7], [6]), stage.new_cache("dense", 5, 17))  # prefill
    assert not stage.planned().takes(5, 17, xs[:2], BatchLayout([7, 8], [1, 1]), stage.new_cache("dense", 5, 17))
