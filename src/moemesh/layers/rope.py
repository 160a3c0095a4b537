"""Rotary position embeddings with explicit positions (default frequencies, or given ones)."""
from __future__ import annotations

import torch

from ..quant import decode_kernels


class RotaryEmbedding:
    """Computes cos/sin for arbitrary positions; every sequence in a batch brings its own."""

    def __init__(
        self, head_dim: int, theta: float, inv_freq: torch.Tensor | None = None, attention_factor: float = 1.0
    ) -> None:
        """inv_freq: precomputed frequencies (scaled RoPE such as YaRN, layers/yarn.py);
        attention_factor multiplies cos and sin, as transformers does for scaled kinds."""
        if inv_freq is None:  # [D/2]
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.inv_freq = inv_freq.float()
        self.attention_factor = float(attention_factor)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D] (broadcast over heads)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos[:, None, :], sin[:, None, :]


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen3.5's M-RoPE: positions on three axes (time, row, column) share the rotary frequencies,
    interleaved: frequency j follows the row axis when j % 3 == 1 and j < 3 sections[1], the column
    axis when j % 3 == 2 and j < 3 sections[2], else time. Text tokens have one position on all
    three axes, which is ordinary RoPE; image tokens (models/qwen3_5_vision.py) do not."""

    def __init__(self, head_dim: int, theta: float, sections: list[int]) -> None:
        super().__init__(head_dim, theta)
        self.sections = list(sections)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] (text: every axis the same) or [3, T] -> cos, sin: [T, 1, D]
        if positions.dim() == 1:
            return super().cos_sin(positions)
        freqs = positions.float()[:, :, None] * self.inv_freq  # [3, T, D/2]
        out = freqs[0].clone()
        for axis in (1, 2):
            idx = slice(axis, 3 * self.sections[axis], 3)
            out[:, idx] = freqs[axis][:, idx]
        emb = torch.cat((out, out), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos/sin: [T, 1, R] with R <= D; rotate-half convention of the HF checkpoints.
    # Partial rotary (GLM-4.5, MiniMax-M2, Qwen3-Next: R < D) rotates the first R dims and passes the rest.
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` written into x (x: [T, H, D] with D contiguous, a tensor nothing else reads
    after): one C call where it runs (the same bits; whole-head rotary only), else the reference."""
    lib = None if torch.compiler.is_compiling() else decode_kernels.load()
    if lib is not None and x.stride(-1) == 1 and cos.shape[-1] == x.shape[-1] and cos.is_contiguous() and sin.is_contiguous() \
            and decode_kernels.usable(x, cos, sin):
        return decode_kernels.rope_(lib, x, cos, sin)
    return apply_rope(x, cos, sin)


def make_rotary(head_dim: int, theta: float, rope_scaling: dict | None, max_position_embeddings: int,
                mrope_section: list[int] | None = None) -> RotaryEmbedding:
    """Default RoPE, M-RoPE (``mrope_section``), or YaRN when ``rope_scaling`` says so
    (args.rope_theta_of rejects other kinds)."""
    kind = None if rope_scaling is None else rope_scaling.get("rope_type") or rope_scaling.get("type")
    if mrope_section and kind in (None, "default"):
        return MRotaryEmbedding(head_dim, theta, mrope_section)
    if kind in (None, "default"):
        return RotaryEmbedding(head_dim, theta)
    if kind != "yarn":
        raise ValueError(f"RoPE scaling type {kind!r} is not supported")
    from .yarn import yarn_parameters

    inv_freq, factor = yarn_parameters(rope_scaling, head_dim, theta, max_position_embeddings)
    return RotaryEmbedding(head_dim, theta, inv_freq, factor)
