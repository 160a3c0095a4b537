"""TurboQuant building blocks: Lloyd-Max codebooks, rotations, bit packing, distortion."""
from __future__ import annotations

import math

import pytest
import torch

from moemesh.kvcache.codebook import coordinate_density, lloyd_max
from moemesh.kvcache.hadamard import fwht, random_signs, randomized_hadamard, rotation_matrix
from moemesh.kvcache.packing import BitLayout, plane_widths
from moemesh.kvcache.quantizer import TurboQuantizer, split_rate


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Correctness tests of many small ops: one thread avoids OpenMP barrier stalls on a busy
    2-core machine (measured 13 s vs 2 s for one test); the thread count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# E||u - u_hat||^2 for unit u: the paper's (rounded) values, and the classic Lloyd-Max table for a
# Gaussian (Max 1960), which is the d -> infinity limit of the rotated-coordinate density.
PAPER = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
PAPER_DIGITS = {1: 2, 2: 3, 3: 2, 4: 3}
GAUSSIAN_LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def unit_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_density_is_the_rotated_coordinate_law():
    xs, w = coordinate_density(64)
    assert abs(w.sum().item() - 1) < 1e-12
    assert abs((w * xs).sum().item()) < 1e-12  # symmetric
    assert abs((w * xs * xs).sum().item() - 1 / 64) < 1e-9  # E[x^2] = 1/d for a unit vector


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_matches_paper_and_gaussian_limit(bits):
    big = lloyd_max(bits, 4096)  # near the Gaussian limit
    assert big.vector_mse == pytest.approx(GAUSSIAN_LLOYD_MAX[bits], rel=5e-3)
    assert round(big.vector_mse, PAPER_DIGITS[bits]) == PAPER[bits]
    cb = lloyd_max(bits, 64)  # SmolLM2's head dim: slightly lighter tails, slightly lower MSE
    assert cb.vector_mse == pytest.approx(GAUSSIAN_LLOYD_MAX[bits], rel=0.05)
    assert cb.vector_mse <= math.sqrt(3) * math.pi / 2 * 4.0**-bits
    c = cb.centroids.double()
    assert torch.all(c[1:] > c[:-1]) and torch.allclose(c, -c.flip(0), atol=1e-7)
    # Lloyd optimality: each centroid is the mean of its cell under the density
    xs, w = coordinate_density(64)
    cell = torch.bucketize(xs, cb.boundaries.double())
    for k in range(1 << bits):
        m = cell == k
        assert (w[m] * xs[m]).sum().item() / w[m].sum().item() == pytest.approx(c[k].item(), abs=2e-5)  # ~grid step


def test_fwht_and_rotations_are_orthogonal():
    x = torch.randn(5, 64)
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    hn = h
    for _ in range(5):
        hn = torch.kron(hn, h)  # Sylvester Hadamard [64, 64]
    torch.testing.assert_close(fwht(x), x @ hn)
    rt = rotation_matrix(64, seed=7)
    torch.testing.assert_close(x @ rt, randomized_hadamard(x, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(x @ rt, fwht(x * random_signs(64, 7)) / 8, atol=1e-5, rtol=0)
    for d in (64, 80, 12):  # 80 and 12 are no powers of two: seeded Haar-random orthogonal matrix
        r = rotation_matrix(d, seed=3)
        torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-5, rtol=0)
        assert torch.equal(r, rotation_matrix(d, seed=3)) and not torch.equal(r, rotation_matrix(d, seed=4))


@pytest.mark.parametrize("groups", [[(64, 4)], [(32, 4), (32, 3)], [(32, 3), (32, 2)], [(6, 4), (6, 3)], [(10, 5), (10, 1)]])
def test_bit_packing_round_trip(groups):
    layout = BitLayout(groups)
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randint(0, 1 << b, (7, 3, n), generator=g) for n, b in groups], dim=-1)
    words = layout.pack(codes)
    assert words.dtype == torch.int32 and words.shape == (7, 3, layout.words)
    assert torch.equal(layout.unpack(words), codes.int())
    # coordinate-major view (what the cache stores) decodes the same codes, transposed
    t = torch.cat(layout.unpack_t(words.transpose(-1, -2)), dim=-2)  # [7, dim, 3]
    assert torch.equal(t.transpose(-1, -2), codes.int())
    if all(n * b % 32 == 0 for n, b in groups):  # no padding: exactly the nominal bits
        assert layout.nbytes * 8 == sum(n * b for n, b in groups)
    assert plane_widths(3) == [2, 1] and plane_widths(7) == [4, 2, 1]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_unit_vector_mse_measured(bits):
    """Empirical E||x - x_hat||^2 of random unit vectors through the full quantizer (rotation,
    codes, packing, decode) equals the codebook's value and the paper's within a few percent."""
    tq = TurboQuantizer(64, bits, seed=1)
    x = unit_vectors(20000, 64, seed=bits)
    words, norms = tq.encode(x)
    mse = ((x - tq.decode(words, norms)) ** 2).sum(-1).mean().item()
    assert mse == pytest.approx(tq.unit_mse, rel=0.02)
    assert mse == pytest.approx(GAUSSIAN_LLOYD_MAX[bits], rel=0.05)
    assert mse < math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize("bits", [2.5, 3.5])
def test_fractional_rates_split_channels(bits):
    assert split_rate(bits, 64) == [(32, math.floor(bits) + 1), (32, math.floor(bits))]
    tq = TurboQuantizer(64, bits, seed=0)
    assert tq.words * 32 == 64 * bits  # 2.5 bits -> 160 bits = 5 words per vector
    x = unit_vectors(20000, 64, seed=5)
    mse = ((x - tq.decode(*tq.encode(x))) ** 2).sum(-1).mean().item()
    lo, hi = lloyd_max(math.floor(bits), 64).vector_mse, lloyd_max(math.ceil(bits), 64).vector_mse
    assert mse == pytest.approx((lo + hi) / 2, rel=0.02)
    with pytest.raises(ValueError):
        split_rate(3.3, 64)


def test_norms_scale_out_and_inner_products():
    """Non-unit vectors: the error scales with the norm. Inner products with random queries: the
    MSE quantizer shrinks <y, x_hat> by E<x, x_hat> = 1 - D (slope), unbiased otherwise, with
    error variance D / d."""
    tq = TurboQuantizer(64, 3, seed=2)
    d_mse = tq.unit_mse
    x = unit_vectors(20000, 64, seed=11)
    scale = torch.rand(20000, 1, generator=torch.Generator().manual_seed(3)) * 50 + 0.1
    xh = tq.decode(*tq.encode(x * scale))
    rel = (((x * scale - xh) ** 2).sum(-1) / scale.squeeze(1) ** 2).mean().item()
    assert rel == pytest.approx(d_mse, rel=0.03)
    y = unit_vectors(20000, 64, seed=12)
    exact, approx = (y * x).sum(-1), (y * xh / scale).sum(-1)
    slope = (approx * exact).sum() / (exact * exact).sum()
    assert slope.item() == pytest.approx(1 - d_mse, abs=0.01)
    err = approx - exact
    assert abs(err.mean().item()) < 3 * err.std().item() / math.sqrt(err.numel())
    assert err.var().item() == pytest.approx(d_mse / 64, rel=0.1)
