"""Images for vision-language models (Qwen3.5, Qwen3-VL): file or bytes -> validated RGB image ->
the patches the vision tower reads, as transformers' Qwen2-VL image processor makes them.

``smart_resize`` picks a size whose sides are multiples of patch x merge with an area between
``min_pixels`` and ``max_pixels`` and the aspect ratio kept; the image is resized there (PIL
bicubic), scaled to [0, 1], normalised by mean/std, and cut into patches listed merge block by
merge block, each patch repeated ``temporal_patch`` times (a still image is a one-frame video).
Bad input is an ImageError naming the problem (an unreadable file, an unsupported format, a
decompression bomb, an extreme aspect ratio), never a crash.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MoemeshError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_SOURCE_PIXELS = 64 * 2**20  # refuse to decode larger images (decompression bombs)


class ImageError(MoemeshError):
    """An image the model cannot take: unreadable, unsupported, too large. The server answers 400."""


@dataclass(frozen=True)
class ImageSpec:
    patch: int = 16
    temporal_patch: int = 2
    merge: int = 2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @classmethod
    def from_dir(cls, path: Path, patch: int, temporal_patch: int, merge: int) -> ImageSpec:
        """preprocessor_config.json's values where the checkpoint has one, else the tower's sizes and
        Qwen's defaults."""
        cfg = {}
        if (path / "preprocessor_config.json").is_file():
            cfg = json.loads((path / "preprocessor_config.json").read_text())
        size = cfg.get("size") or {}
        return cls(patch=int(cfg.get("patch_size", patch)), temporal_patch=int(cfg.get("temporal_patch_size", temporal_patch)),
                   merge=int(cfg.get("merge_size", merge)), mean=tuple(cfg.get("image_mean", cls.mean)),
                   std=tuple(cfg.get("image_std", cls.std)),
                   min_pixels=int(size.get("shortest_edge", cfg.get("min_pixels", cls.min_pixels))),
                   max_pixels=int(size.get("longest_edge", cfg.get("max_pixels", cls.max_pixels))))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over 200:1")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def open_image(data: bytes | str | Path):
    """Bytes or a path -> an RGB PIL image, or ImageError."""
    from PIL import Image, UnidentifiedImageError

    what = "image data" if isinstance(data, bytes) else str(data)
    try:
        raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    except OSError as exc:
        raise ImageError(f"{what}: cannot read ({exc.strerror or exc})") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in FORMATS:
                raise ImageError(f"{what}: unsupported image format {img.format} (supported: {', '.join(FORMATS)})")
            if img.width * img.height > MAX_SOURCE_PIXELS:
                raise ImageError(f"{what}: {img.width}x{img.height} is over {MAX_SOURCE_PIXELS} pixels")
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{what}: not a readable image ({exc})") from None


def preprocess(image, spec: ImageSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """RGB PIL image -> (patches [gh gw, 3 Tp P P] fp32, grid (1, gh, gw))."""
    from PIL import Image

    factor = spec.patch * spec.merge
    h, w = smart_resize(image.height, image.width, factor, spec.min_pixels, spec.max_pixels)
    pixels = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), dtype=np.uint8)  # [h, w, 3]
    x = (pixels.astype(np.float32) * np.float32(1 / 255) - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # [3, h, w]
    gh, gw, m, p = h // spec.patch, w // spec.patch, spec.merge, spec.patch
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # blocks, in-block, C, P, P
    x = x.unsqueeze(5).expand(*x.shape[:5], spec.temporal_patch, p, p)  # a still image: every frame the same
    return x.reshape(gh * gw, 3 * spec.temporal_patch * p * p).contiguous(), (1, gh, gw)
