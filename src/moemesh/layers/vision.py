"""The Qwen3-VL / Qwen3.5 vision tower: image patches -> one embedding per 2x2 merged patch, in the
text model's width. Used by qwen3_5_moe (models/qwen3_5_vision.py builds it from the checkpoint).

Shape legend: N patches of all images together (each C x Tp x P x P pixels, flattened), E tower
width, H heads, Dh = E / H, M = merge^2 patches per output token, O the text model's width.

Per image (grid t x h x w patches, listed merge-block by merge-block as the preprocessing lays
them out): a linear patch embedding (the checkpoint's Conv3d with stride = kernel), plus a learned
square table of position embeddings resampled bilinearly (align_corners) to the h x w grid; then
ViT blocks (LayerNorm -> attention over the image's own patches with 2-D rotary positions (row,
col), LayerNorm -> GELU MLP), then the merger (LayerNorm, M neighbouring patches concatenated,
Linear -> GELU -> Linear to O).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mlp import ACTIVATIONS
from .rope import apply_rope


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    width: int  # E
    heads: int
    intermediate: int
    out_width: int  # O
    patch: int
    temporal_patch: int
    merge: int
    in_channels: int
    num_positions: int  # entries of the learned (square) position table
    act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch * self.patch * self.patch


def patch_positions(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """(row, col) of each patch in merge-block order: [t h w, 2]."""
    t, h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    blocks = (h // merge, merge, w // merge, merge)
    rows, cols = (x.reshape(blocks).transpose(1, 2).reshape(-1) for x in (rows, cols))
    return torch.stack([rows, cols], dim=-1).repeat(t, 1)


def resampled_positions(table: torch.Tensor, pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The [S*S, E] learned table resampled bilinearly (align_corners) to an h x w grid, at the
    patches ``pos`` [n, 2] (row, col) -> [n, E]."""
    side = int(round(table.shape[0] ** 0.5))

    def axis(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = index.float() * (side - 1) / max(size - 1, 1)  # [n]
        lo = src.floor()
        taps = (lo.long()[:, None] + torch.arange(2)).clamp(0, side - 1)  # [n, 2]
        weights = (1 - (src[:, None] - lo[:, None] - torch.arange(2)).abs()).clamp(min=0)
        return taps, weights

    (rt, rw), (ct, cw) = axis(pos[:, 0], h), axis(pos[:, 1], w)
    idx = (rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4)  # [n, 4] bilinear taps
    wts = (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4)
    return (table[idx] * wts[..., None]).sum(dim=1)


def params(tensors: dict[str, torch.Tensor]) -> torch.nn.ParameterDict:
    """Checkpoint tensors as fp32 parameters, dots in their names turned into underscores."""
    return torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(v.float(), requires_grad=False)
                                   for k, v in tensors.items()})


class VisionBlock(torch.nn.Module):
    def __init__(self, cfg: VisionConfig, t: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.p = params(t)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        # x: [N, E]; cos/sin: [N, 1, Dh]
        c, p = self.cfg, self.p
        n, dh = x.shape[0], c.width // c.heads
        h = F.layer_norm(x, (c.width,), p["norm1_weight"], p["norm1_bias"], 1e-6)
        q, k, v = F.linear(h, p["attn_qkv_weight"], p["attn_qkv_bias"]).view(n, 3, c.heads, dh).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = torch.cat([F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
                         .transpose(0, 1) for qi, ki, vi in zip(*(z.split(lengths) for z in (q, k, v)))])  # each image alone
        x = x + F.linear(out.reshape(n, c.width), p["attn_proj_weight"], p["attn_proj_bias"])
        h = F.layer_norm(x, (c.width,), p["norm2_weight"], p["norm2_bias"], 1e-6)
        h = ACTIVATIONS[c.act](F.linear(h, p["mlp_linear_fc1_weight"], p["mlp_linear_fc1_bias"]))
        return x + F.linear(h, p["mlp_linear_fc2_weight"], p["mlp_linear_fc2_bias"])


class VisionTower(torch.nn.Module):
    def __init__(self, cfg: VisionConfig, tensors: dict[str, torch.Tensor]) -> None:
        """tensors: the checkpoint's vision tensors under their names below ``visual.``."""
        super().__init__()
        self.cfg = cfg
        t = {k: v.float() for k, v in tensors.items()}
        self.patch_w = torch.nn.Parameter(t["patch_embed.proj.weight"].reshape(cfg.width, -1), requires_grad=False)
        self.patch_b = torch.nn.Parameter(t["patch_embed.proj.bias"], requires_grad=False)
        self.pos_table = torch.nn.Parameter(t["pos_embed.weight"], requires_grad=False)  # [S*S, E]
        self.blocks = torch.nn.ModuleList(
            VisionBlock(cfg, {k[len(f"blocks.{i}."):]: v for k, v in t.items() if k.startswith(f"blocks.{i}.")})
            for i in range(cfg.depth))
        self.merger = params({k[len("merger."):]: v for k, v in t.items() if k.startswith("merger.")})
        dh = cfg.width // cfg.heads
        half = dh // 2  # rows rotate the first half of the frequencies, columns the second
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))  # [Dh/4]

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels: [N, C Tp P P] (preprocessing's patches), grids: (t, h, w) per image -> [N / M, O]."""
        c = self.cfg
        x = F.linear(pixels.float(), self.patch_w, self.patch_b)  # [N, E]
        pos = torch.cat([patch_positions(g, c.merge) for g in grids])  # [N, 2]
        x = x + torch.cat([resampled_positions(self.pos_table, patch_positions(g, c.merge), g[1], g[2])
                           for g in grids])
        freqs = (pos[:, :, None].float() * self.inv_freq).reshape(pos.shape[0], -1)  # [N, Dh/2]: rows | cols
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [N, 1, Dh]
        cos, sin = emb.cos(), emb.sin()
        lengths = [t * h * w for t, h, w in grids]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        m = self.merger
        x = F.layer_norm(x, (c.width,), m["norm_weight"], m["norm_bias"], 1e-6).view(-1, c.width * c.merge**2)
        x = F.gelu(F.linear(x, m["linear_fc1_weight"], m["linear_fc1_bias"]))
        return F.linear(x, m["linear_fc2_weight"], m["linear_fc2_bias"])  # [N / M, O]
