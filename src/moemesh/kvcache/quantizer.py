"""TurboQuant (MSE variant) for one vector width: norm + rotation + Lloyd-Max codes.

encode: x -> (||x||, codes of the rotated unit vector), decode: codes -> centroids (rotated
space) -> scale by the norm -> rotate back. Fractional rates split the rotated coordinates into
two groups: the first round(frac * d) at floor(bits) + 1 bits, the rest at floor(bits). After
the rotation every coordinate has the same density, so which coordinates get the extra bit does
not matter; both groups use codebooks for the same d-dimensional density.
"""
from __future__ import annotations

import math

import torch

from .codebook import Codebook, lloyd_max
from .hadamard import rotation_matrix
from .packing import BitLayout

NORM_DTYPE = torch.float16  # 2 bytes; relative error 5e-4, far below the codes' error
NORM_MAX = torch.finfo(NORM_DTYPE).max


def split_rate(bits: float, dim: int) -> list[tuple[int, int]]:
    """(coordinates, bits) groups realising an average of ``bits`` per coordinate."""
    if not 1 <= bits <= 7:
        raise ValueError(f"TurboQuant bits must be in [1, 7], got {bits}")
    lo = math.floor(bits)
    n_hi = round((bits - lo) * dim)
    if abs(lo + n_hi / dim - bits) > 1e-9:
        raise ValueError(f"{bits} bits per coordinate cannot be split over {dim} coordinates")
    return [(n_hi, lo + 1), (dim - n_hi, lo)]


class TurboQuantizer:
    def __init__(self, dim: int, bits: float, seed: int, codebooks: list[Codebook] | None = None) -> None:
        """``codebooks`` (one per group, as ``split_rate`` orders them) lets quantizers that differ
        only in their rotation seed (one per layer) share the Lloyd-Max work."""
        self.dim, self.bits, self.seed = dim, bits, seed
        self.rt = rotation_matrix(dim, seed)  # [d, d]: x_rot = x @ rt, x = x_rot @ rt.T
        self.r = self.rt.t().contiguous()
        groups = [(n, b) for n, b in split_rate(bits, dim) if n > 0]
        self.layout = BitLayout(groups)
        self.codebooks: list[Codebook] = codebooks or [lloyd_max(b, dim) for _, b in groups]
        self.sizes = [n for n, _ in groups]

    @property
    def words(self) -> int:
        """Packed int32 words per vector (norm not included)."""
        return self.layout.words

    @property
    def unit_mse(self) -> float:
        """Expected ||u - u_hat||^2 for a unit vector u (from the codebooks' densities)."""
        return sum(n * cb.coord_mse for n, cb in zip(self.sizes, self.codebooks))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., d] in the rotated basis."""
        return x @ self.rt

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.r

    def normalize_rotate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., d] -> (norms float32 [...], rotated unit vectors [..., d]): the input to the
        codebooks (shared by ``encode`` and the native packer so both see identical floats)."""
        x = x.float()
        norms = x.norm(dim=-1)  # [...]
        return norms, self.rotate(x / norms.clamp_min(1e-30).unsqueeze(-1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., d] float -> (int32 words [..., words], norms float16 [...])."""
        norms, unit = self.normalize_rotate(x)
        codes = torch.cat(
            [cb.quantize(part.contiguous()) for cb, part in zip(self.codebooks, unit.split(self.sizes, dim=-1))], dim=-1
        )  # [..., d] uint8
        return self.layout.pack(codes), norms.clamp(max=NORM_MAX).to(NORM_DTYPE)

    def centroids_t(self, words: torch.Tensor) -> list[torch.Tensor]:
        """words int32 [..., words, N] (coordinate-major) -> per group float32 [..., n_g, N]:
        the rotated unit vectors' coordinates, transposed."""
        out = []
        for cb, idx in zip(self.codebooks, self.layout.unpack_t(words)):
            out.append(cb.centroids.index_select(0, idx.reshape(-1)).view(idx.shape))
        return out

    def decode(self, words: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(words [..., words], norms [...]) -> x_hat float32 [..., d] in the original basis."""
        parts = self.centroids_t(words.unsqueeze(-1))  # [..., n_g, 1] each
        unit = torch.cat(parts, dim=-2).squeeze(-1)  # [..., d]
        return self.unrotate(unit * norms.float().unsqueeze(-1))

    def decode_t(self, words: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(words [..., words, N], norms [..., N]) -> x_hat float32 [..., N, d] (original basis)."""
        unit = torch.cat(self.centroids_t(words), dim=-2).transpose(-1, -2)  # [..., N, d]
        return self.unrotate(unit * norms.float().unsqueeze(-1))
