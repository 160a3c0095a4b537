"""Masked mode: routers restricted to one shard's experts, against a per-token reference."""
import pytest
import torch

from moemesh.batch import BatchLayout
from moemesh.errors import MoemeshError
from moemesh.layers.gpt_oss_moe import LogitTopKRouter
from moemesh.layers.router import TopKRouter
from moemesh.loading.loader import load_model
from moemesh.mesh.shards.masked import MaskedRouter, mask_model, masked_reference, moe_blocks, shard_experts


def test_shard_experts_balanced_and_complete():
    for e, n in [(8, 2), (8, 3), (6, 4), (64, 4), (5, 5)]:
        shards = shard_experts(e, n)
        assert sorted(x for s in shards for x in s) == list(range(e))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(MoemeshError, match="cannot split"):
        shard_experts(4, 5)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_masked_router_matches_reference(norm, mode):
    g = torch.Generator().manual_seed(0)
    router = TopKRouter(torch.randn(12, 16, generator=g), top_k=3, norm_topk_prob=norm)
    x = torch.randn(9, 16, generator=g)  # [T, D]
    full = MaskedRouter(router, list(range(12)), mode)(x)
    ref = router(x)
    assert torch.equal(full[0], ref[0]) and torch.allclose(full[1], ref[1], atol=1e-6)  # nothing masked: exact
    allowed = [1, 4, 5, 7, 10]
    ids, w = MaskedRouter(router, allowed, mode)(x)
    rids, rw = masked_reference(router, x, allowed, mode)
    assert torch.equal(ids, rids)
    assert torch.allclose(w, rw, atol=1e-6)
    assert set(ids.flatten().tolist()) <= set(allowed)
    if norm:  # renormalising cancels the softmax denominator: both modes agree
        other = MaskedRouter(router, allowed, "probs" if mode == "logits" else "logits")(x)
        assert torch.equal(other[0], ids) and torch.allclose(other[1], w, atol=1e-6)


def test_masked_logit_topk_router():
    g = torch.Generator().manual_seed(1)
    router = LogitTopKRouter(torch.randn(8, 16, generator=g), torch.randn(8, generator=g), top_k=2)
    x = torch.randn(5, 16, generator=g)
    ids, w = MaskedRouter(router, list(range(8)))(x)
    assert torch.equal(ids, router(x)[0])
    ids, w = MaskedRouter(router, [0, 2, 6])(x)
    assert set(ids.flatten().tolist()) <= {0, 2, 6}
    assert torch.allclose(w.sum(-1), torch.ones(5))


def test_bad_masks_are_clear_errors():
    router = TopKRouter(torch.randn(4, 8), top_k=2, norm_topk_prob=True)
    with pytest.raises(MoemeshError, match="cannot fill top-2"):
        MaskedRouter(router, [3])
    with pytest.raises(MoemeshError, match=r"\[0, 4\)"):
        MaskedRouter(router, [3, 4])
    with pytest.raises(MoemeshError, match="mode"):
        MaskedRouter(router, [0, 1], "nope")


def _logits(model, ids):
    cache = model.new_cache()
    cache.add_sequence(0)
    return model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]), all_logits=True)


def test_mask_model_uses_only_shard_experts_and_undoes(tiny_checkpoints):
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    model = load_model(str(d), "fp32").model
    ids = list(range(3, 40))
    exact = _logits(model, ids)
    blocks = moe_blocks(model)
    seen: list[int] = []
    provider = blocks[0].provider
    run = provider.run

    def spy(layer, x, ids_, w):
        seen.extend(ids_.flatten().tolist())
        return run(layer, x, ids_, w)

    provider.run = spy
    try:
        undo = mask_model(model, list(range(8)))  # the whole model as one shard: exact
        assert torch.allclose(_logits(model, ids), exact, atol=1e-5)
        undo()
        shard = shard_experts(8, 2)[1]
        seen.clear()
        undo = mask_model(model, shard)
        masked = _logits(model, ids)
        assert seen and set(seen) <= set(shard)
        assert not torch.allclose(masked, exact, atol=1e-3)
        undo()
        assert all(isinstance(b.router, TopKRouter) for b in blocks)
        assert torch.allclose(_logits(model, ids), exact, atol=1e-5)
    finally:
        provider.run = run
