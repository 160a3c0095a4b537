"""The softmax top-k router's C call (decode_kernels.router_topk) against its torch reference."""
import pytest
import torch

from moemesh.layers.router import TopKRouter
from moemesh.quant import decode_kernels

lib = decode_kernels.load()
pytestmark = pytest.mark.skipif(lib is None, reason="decode kernels not built (no compiler)")


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("e,k,d", [(16, 15, 576), (128, 8, 96), (8, 2, 40), (60, 4, 33)])
def test_router_kernel_matches_reference(e, k, d, norm):
    g = torch.Generator().manual_seed(e * 1000 + k)
    router = TopKRouter(torch.randn(e, d, generator=g) * 0.2, k, norm)
    x = torch.randn(37, d, generator=g)
    ids, w = router(x)  # the C call
    rids, rw = router.reference(x)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape == (37, k)
    assert torch.equal(ids, rids)  # random logits: no near-ties at fp32 rounding
    torch.testing.assert_close(w, rw, rtol=2e-5, atol=1e-6)  # summation order: logits ~5 carry ~1e-6


def test_router_kernel_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(3)
    router = TopKRouter(torch.randn(32, 64, generator=g), 4, True)
    x = torch.randn(9, 64, generator=g)
    ids, w = router(x)
    for r in range(9):
        i1, w1 = router(x[r : r + 1])
        assert torch.equal(i1[0], ids[r]) and torch.equal(w1[0], w[r])


def test_router_kernel_ties_and_strided_rows():
    router = TopKRouter(torch.zeros(6, 8), 3, False)  # every logit equal: the lowest ids, in order
    ids, w = router(torch.randn(2, 8))
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(w, torch.full((2, 3), 1 / 6))
    g = torch.Generator().manual_seed(5)
    router = TopKRouter(torch.randn(10, 16, generator=g), 2, True)
    x = torch.randn(4, 32, generator=g)[:, ::2]  # rows with stride 2 inside
    assert torch.equal(router(x)[0], router.reference(x)[0])
