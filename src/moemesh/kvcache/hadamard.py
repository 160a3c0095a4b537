"""Seeded random rotations for TurboQuant: randomized Hadamard (power-of-two dims) or Haar.

A rotation R makes every input vector's coordinates follow the same known density, so one
fixed scalar codebook fits all of them. For d a power of two we use R = H diag(s) / sqrt(d)
(random signs s, Sylvester Hadamard H), built with the fast Walsh-Hadamard transform. For other
d there is no Hadamard matrix of that size in general; padding to the next power of two would
store more coordinates per vector, so we use a seeded Haar-random orthogonal matrix (QR of a
Gaussian matrix) instead, which has the exact density the codebook assumes.

Rotations are returned as a dense [d, d] matrix and applied as ``x @ Rt``: for head dims of
64-256 one small GEMM over many vectors is faster on CPU than log2(d) butterfly passes in Python.
"""
from __future__ import annotations

import math

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (a power of two): x @ H."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"FWHT needs a power-of-two length, got {n}")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)  # butterflies pair element j with j + h in each 2h block
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(x.shape)


def random_signs(dim: int, seed: int) -> torch.Tensor:
    """[dim] float32 of +-1, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1


def randomized_hadamard(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x [..., d] -> H diag(s) x / sqrt(d) per vector (the transform ``rotation_matrix`` builds)."""
    d = x.shape[-1]
    return fwht(x * random_signs(d, seed)) / math.sqrt(d)


def rotation_matrix(dim: int, seed: int) -> torch.Tensor:
    """Rt [dim, dim] float32, orthogonal: the rotated form of row vectors x [..., dim] is x @ Rt."""
    if is_power_of_two(dim):
        # Row i of diag(s) H / sqrt(d) is the transform of s_i e_i, so Rt = randomized_hadamard(I).
        return randomized_hadamard(torch.eye(dim), seed).contiguous()
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # sign fix makes Q Haar-distributed
    return q.float().contiguous()
