"""Lloyd-Max scalar codebooks for one coordinate of a randomly rotated unit vector.

After a uniformly random rotation, a coordinate x of a unit vector in d dimensions has density
f(x) proportional to (1 - x^2)^((d-3)/2) on [-1, 1] (a shifted Beta((d-1)/2, (d-1)/2); close to
N(0, 1/d) for large d). The codebook minimising E[(x - c(x))^2] under f is found by Lloyd's
iteration (cells = midpoints between centroids, centroid = conditional mean of its cell) on a
fine midpoint grid. Nothing is hard-coded: the centroids are computed for each (bits, d).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GRID = 1 << 17  # midpoint cells on [-1, 1]; with d=64 the spacing is ~1e-3 of a std
MAX_ITERS = 5000
TOL = 1e-13  # stop when no centroid moves more than this (in units of x)


@dataclass(frozen=True)
class Codebook:
    bits: int
    dim: int
    centroids: torch.Tensor  # [2^bits] float32, increasing
    boundaries: torch.Tensor  # [2^bits - 1] float32, midpoints between centroids
    coord_mse: float  # E[(x - c(x))^2] for one coordinate under f
    iterations: int

    @property
    def vector_mse(self) -> float:
        """E||u - u_hat||^2 for a unit vector u when every coordinate uses this codebook."""
        return self.dim * self.coord_mse

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x: [...] rotated unit-vector coordinates -> codes uint8 [...] (nearest centroid)."""
        return torch.bucketize(x, self.boundaries).to(torch.uint8)


def coordinate_density(dim: int, grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoint grid xs [grid] on (-1, 1) and normalised cell weights w [grid] (sum 1), float64."""
    if dim < 2:
        raise ValueError(f"dimension must be at least 2, got {dim}")
    xs = (torch.arange(grid, dtype=torch.float64) + 0.5) * (2.0 / grid) - 1.0
    logf = 0.5 * (dim - 3) * torch.log1p(-xs * xs)  # log-domain: (1-x^2)^((d-3)/2) underflows for big d
    w = torch.exp(logf - logf.max())
    return xs, w / w.sum()


def lloyd_max(bits: int, dim: int, grid: int = GRID) -> Codebook:
    """The b-bit MSE-optimal codebook for a rotated coordinate in ``dim`` dimensions."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    levels = 1 << bits
    xs, w = coordinate_density(dim, grid)
    cw = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])  # [grid+1] prefix sums of mass
    cwx = torch.cat([w.new_zeros(1), torch.cumsum(w * xs, 0)])  # and of first moment
    # Start from equal-mass cells (quantiles): already close, so Lloyd converges quickly.
    edges = torch.searchsorted(cw[1:-1].contiguous(), torch.arange(1, levels, dtype=torch.float64) / levels)
    cents = _cell_means(cw, cwx, edges, xs)
    iters = 0
    for iters in range(1, MAX_ITERS + 1):
        bounds = 0.5 * (cents[1:] + cents[:-1])  # [L-1]
        edges = torch.searchsorted(xs, bounds)  # cell k = grid points [edges[k-1], edges[k])
        new = _cell_means(cw, cwx, edges, xs)
        moved = (new - cents).abs().max().item()
        cents = new
        if moved < TOL:
            break
    cents = 0.5 * (cents - cents.flip(0))  # f is even: symmetrise away grid round-off
    bounds = 0.5 * (cents[1:] + cents[:-1])
    cell = torch.bucketize(xs, bounds)
    mse = (w * (xs - cents[cell]) ** 2).sum().item()
    return Codebook(bits, dim, cents.float(), bounds.float(), mse, iters)


def _cell_means(cw: torch.Tensor, cwx: torch.Tensor, edges: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Conditional mean of x in each cell delimited by grid indices ``edges`` ([L-1])."""
    lo = torch.cat([edges.new_zeros(1), edges])
    hi = torch.cat([edges, edges.new_full((1,), xs.numel())])
    mass = cw[hi] - cw[lo]
    mid = 0.5 * (xs[lo.clamp(max=xs.numel() - 1)] + xs[(hi - 1).clamp(min=0)])  # empty cell: keep it put
    return torch.where(mass > 0, (cwx[hi] - cwx[lo]) / mass.clamp_min(1e-300), mid)
