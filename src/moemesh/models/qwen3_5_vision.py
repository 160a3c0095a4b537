"""Qwen3.5's image input: the vision tower built from the checkpoint (``model.visual.*``), where the
image tokens go in the prompt and their M-RoPE positions.

A prompt holds each image as ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch +
``<|vision_end|>``; the pads' embeddings are replaced by the tower's outputs. Positions have three
axes (time, row, column): text tokens advance all three together; an image's tokens sit at
start + (0, row, col) of its merged grid, and the text after it resumes at start + max(rows, cols).
Every later token's position is its index plus one fixed offset (``delta``), so decoding needs
no image state.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.vision import VisionConfig, VisionTower
from ..tokenizer.images import ImageError, ImageSpec, preprocess, smart_resize
from .media import Media

PREFIX = "model.visual."


@dataclass(frozen=True)
class ImageTokens:
    image: int  # <|image_pad|>
    start: int  # <|vision_start|>
    end: int  # <|vision_end|>


def vision_config(cfg: dict[str, Any]) -> VisionConfig | None:
    """The tower's config, or None for a text-only checkpoint."""
    v = cfg.get("vision_config")
    if not v:
        return None
    side = int(v.get("num_position_embeddings", 2304))
    return VisionConfig(
        depth=int(v["depth"]), width=int(v["hidden_size"]), heads=int(v["num_heads"]),
        intermediate=int(v["intermediate_size"]),
        out_width=int(v.get("out_hidden_size") or (cfg.get("text_config") or cfg)["hidden_size"]),
        patch=int(v.get("patch_size", 16)), temporal_patch=int(v.get("temporal_patch_size", 2)),
        merge=int(v.get("spatial_merge_size", 2)), in_channels=int(v.get("in_channels", 3)), num_positions=side,
        act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )


def image_tokens(cfg: dict[str, Any]) -> ImageTokens:
    return ImageTokens(int(cfg.get("image_token_id", 248056)), int(cfg.get("vision_start_token_id", 248053)),
                       int(cfg.get("vision_end_token_id", 248054)))


def build_tower(cfg: dict[str, Any], source) -> VisionTower | None:
    """The vision tower from the checkpoint's tensors; None when the config has none. A config with a
    tower whose tensors are missing (a text-only conversion) is an error naming the tensor."""
    vc = vision_config(cfg)
    if vc is None:
        return None
    names = [n for n in source.ckpt.names() if n.startswith(PREFIX)]
    if not names:
        raise CheckpointError(f"the config describes a vision tower but the checkpoint has no {PREFIX}* tensors")
    return VisionTower(vc, {n[len(PREFIX):]: source.get(n) for n in names})


def mrope_positions(ids: list[int], tokens: ImageTokens, grids: list[tuple[int, int, int]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """([3, len(ids)] positions, delta): later tokens sit at their index + delta on all three axes.
    ``grids`` are the images' (t, h, w) patch grids in prompt order; each image's pads are consecutive."""
    out, pos, i, k = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != tokens.image:
            j = i
            while j < len(ids) and ids[j] != tokens.image:
                j += 1
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        if k >= len(grids):
            raise ValueError("the prompt has more image placeholders than images")
        t, h, w = grids[k]
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        i, k, pos = i + t * gh * gw, k + 1, pos + max(gh, gw)
    if k != len(grids):
        raise ValueError(f"{len(grids)} images but {k} placeholder runs in the prompt")
    positions = torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)
    return positions, int(positions.max()) + 1 - len(ids) if len(ids) else 0


class ImageInput:
    """A Qwen3.5 checkpoint's image path: images -> placeholder tokens in the prompt + Media. The
    tower is built from the checkpoint on the first image (text-only use pays nothing for it)."""

    def __init__(self, build: Callable[[], VisionTower], cfg: VisionConfig, tokens: ImageTokens, spec: ImageSpec) -> None:
        self._build, self._tower = build, None
        self.cfg, self.tokens, self.spec = cfg, tokens, spec

    @property
    def tower(self) -> VisionTower:
        if self._tower is None:
            self._tower = self._build()
        return self._tower

    def tokens_per_image(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.cfg.merge**2

    def placeholder(self) -> list[int]:
        """One image as a chat template writes it: vision start, one pad, vision end."""
        return [self.tokens.start, self.tokens.image, self.tokens.end]

    def grid(self, image) -> tuple[int, int, int]:
        """The (t, h, w) patch grid an RGB image will have, without preprocessing it (counts tokens)."""
        p = self.spec.patch
        h, w = smart_resize(image.height, image.width, p * self.spec.merge, self.spec.min_pixels, self.spec.max_pixels)
        return 1, h // p, w // p

    def fit(self, image):
        """(the image resized to the size preprocess() reads, its grid): preprocess() of the result is
        preprocess() of the original (resizing to the same size is a copy), at a bounded size."""
        from PIL import Image

        grid = self.grid(image)
        size = (grid[2] * self.spec.patch, grid[1] * self.spec.patch)  # (w, h)
        return (image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)), grid

    def expand(self, ids: list[int], grids: list[tuple[int, int, int]]) -> list[int]:
        """ids with each ``<|image_pad|>`` repeated once per merged patch of its image's grid."""
        pads = [i for i, t in enumerate(ids) if t == self.tokens.image]
        if len(pads) != len(grids):
            raise ImageError(f"the prompt has {len(pads)} image placeholders for {len(grids)} images")
        out: list[int] = []
        last = 0
        for i, g in zip(pads, grids):
            out += ids[last:i] + [self.tokens.image] * self.tokens_per_image(g)
            last = i + 1
        return out + ids[last:]

    def prepare(self, ids: list[int], images: list) -> tuple[list[int], Media]:
        """ids with one ``<|image_pad|>`` per image (as a chat template renders an image part), and
        RGB images in that order -> (ids with each pad repeated once per merged patch, Media)."""
        pads = [i for i, t in enumerate(ids) if t == self.tokens.image]
        if len(pads) != len(images):
            raise ImageError(f"the prompt has {len(pads)} image placeholders for {len(images)} images")
        patches = [preprocess(img, self.spec) for img in images]
        grids = [g for _, g in patches]
        out = self.expand(ids, grids)
        embeds = self.tower(torch.cat([p for p, _ in patches]), grids) if images else torch.zeros(0, self.cfg.out_width)
        positions, delta = mrope_positions(out, self.tokens, grids, self.cfg.merge)
        rows = torch.tensor([i for i, t in enumerate(out) if t == self.tokens.image], dtype=torch.long)
        return out, Media(rows, embeds, positions, delta)


def image_input(cfg: dict[str, Any], source, path: str | Path) -> ImageInput | None:
    """The checkpoint's image path, or None when it has no vision tower (a text-only config, or a
    conversion that dropped the tower's tensors)."""
    vc = vision_config(cfg)
    if vc is None or not any(n.startswith(PREFIX) for n in source.ckpt.names()):
        return None
    return ImageInput(lambda: build_tower(cfg, source), vc, image_tokens(cfg),
                      ImageSpec.from_dir(Path(path), vc.patch, vc.temporal_patch, vc.merge))
