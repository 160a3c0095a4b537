"""WeightSource: where the builder gets tensors by HF name (safetensors dir, GGUF, store)."""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import CheckpointError
from ..quant.int4_trunk import Int4Groups, dequantize, groups


class WeightSource(Protocol):
    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor in HF orientation, in its stored float dtype (dequantized if needed)."""

    def int4_groups(self, name: str) -> Int4Groups | None:
        """Exact 4-bit groups (w = q * scale + min, 32 columns a group) when stored that way."""


BLOCKS = ".blocks."  # an expert store's trunk tensor kept in its GGUF block format: NAME.blocks.QTYPE, uint8 rows


FP8_SCALE = "_scale_inv"  # an FP8 checkpoint's NAME.weight (e4m3) beside NAME.weight_scale_inv (128x128 blocks)


class SafetensorsSource:
    """Adapts a SafetensorsCheckpoint: float tensors, an expert store's int4 trunk linears
    (NAME.q4 / .q4_scale / .q4_zero, weights/int4_trunk.py) as exact 4-bit groups, a store's
    block-format trunk tensors (NAME.blocks.QTYPE: the raw rows a GGUF held) and an FP8 checkpoint's
    e4m3 weights with their block scales (DeepSeek-V3/R1's ``weight_scale_inv``; quant/fp8.py's rows)
    as ``blocks``; ``get`` dequantizes both."""

    def __init__(self, ckpt) -> None:
        self.ckpt = ckpt
        self._blocks = {n.split(BLOCKS)[0]: n for n in ckpt.names() if BLOCKS in n}  # NAME -> its stored name
        self._fp8 = {n[: -len(FP8_SCALE)] for n in ckpt.names() if n.endswith(".weight" + FP8_SCALE)
                     and ckpt.has(n[: -len(FP8_SCALE)])}  # FP8 weights' names

    def has(self, name: str) -> bool:
        return self.ckpt.has(name) or self.ckpt.has(name + ".q4") or name in self._blocks

    def get(self, name: str) -> torch.Tensor:
        if not self.ckpt.has(name) and self.ckpt.has(name + ".q4"):
            return dequantize(*self.int4_parts(name))
        if (not self.ckpt.has(name) and name in self._blocks) or name in self._fp8:
            from ..quant.blocks import BlockLinear

            return BlockLinear(*self.blocks(name)).dequantize()  # type: ignore[misc]
        return self.ckpt.get(name)

    def release_view(self, t: torch.Tensor) -> int:
        """Page out a view of the files the build has just copied (SafetensorsCheckpoint.page_out_view)."""
        return self.ckpt.page_out_view(t)

    def blocks(self, name: str) -> tuple[str, torch.Tensor, int] | None:
        """(qtype, raw uint8 [N, row_bytes] (an mmap view; FP8: packed rows, a copy), in_features) of a
        block-format tensor."""
        if name in self._fp8:
            from ..quant import fp8

            weight = self.ckpt.get(name)
            if weight.dtype not in (torch.float8_e4m3fn, torch.uint8) or weight.dim() != 2:
                raise CheckpointError(f"{name}: an FP8 weight (it has {name + FP8_SCALE}) must be 2-D e4m3, "
                                      f"got {weight.dtype} {tuple(weight.shape)}")
            try:
                return fp8.QTYPE, fp8.pack(weight, self.ckpt.get(name + FP8_SCALE)), weight.shape[1]
            except ValueError as exc:
                raise CheckpointError(f"{name}: {exc}") from None
        stored = self._blocks.get(name)
        if stored is None:
            return None
        from ..quant.blocks import block_size

        qtype = stored.split(BLOCKS)[1]
        raw = self.ckpt.get(stored)
        block, size = block_size(qtype)
        return qtype, raw, raw.shape[1] // size * block

    def stored_type(self, name: str) -> str:
        if name in self._fp8:
            from ..quant import fp8

            return fp8.QTYPE
        stored = self._blocks.get(name)
        return stored.split(BLOCKS)[1] if stored else str(self.get(name).dtype).removeprefix("torch.")

    def int4_groups(self, name: str) -> Int4Groups | None:
        if not self.ckpt.has(name + ".q4"):
            return None
        return groups(*self.int4_parts(name))

    def int4_parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(packed uint8 [N, K/2], scale, zero bf16 [N, K/32]) as mmap views, or None."""
        if not self.ckpt.has(name + ".q4"):
            return None
        return tuple(self.ckpt.get(name + sfx) for sfx in (".q4", ".q4_scale", ".q4_zero"))  # type: ignore[return-value]


class AliasedSource:
    """A source whose checkpoint nests the text model under other prefixes (multimodal checkpoints:
    Qwen3.5's ``model.language_model.``, Kimi K2.5's ``language_model.model.``), read by the
    canonical names the builders use (``model.layers...``, ``lm_head...``). A canonical name that is
    stored as such wins (a store's trunk, written under canonical names, reads back unchanged).

    ``aliases``: (canonical prefix, stored prefix) pairs. ``ckpt`` is the inner checkpoint seen
    the same way: ``names()`` lists canonical names; other attributes pass through."""

    def __init__(self, inner, aliases: tuple[tuple[str, str], ...]) -> None:
        self.inner, self.aliases = inner, aliases
        if hasattr(inner, "ckpt"):
            self.ckpt = _AliasedCheckpoint(inner.ckpt, aliases)

    def resolve(self, name: str) -> str:
        """The stored name of canonical ``name`` (itself when stored as such or not found)."""
        if self.inner.has(name):
            return name
        for canonical, stored in self.aliases:
            if name.startswith(canonical) and self.inner.has(stored + name[len(canonical):]):
                return stored + name[len(canonical):]
        return name

    def has(self, name: str) -> bool:
        return self.inner.has(self.resolve(name))

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self.resolve(name))

    def int4_groups(self, name: str) -> Int4Groups | None:
        return self.inner.int4_groups(self.resolve(name))

    def int4_parts(self, name: str):
        parts = getattr(self.inner, "int4_parts", None)
        return None if parts is None else parts(self.resolve(name))


class _AliasedCheckpoint:
    def __init__(self, ckpt, aliases: tuple[tuple[str, str], ...]) -> None:
        self._ckpt, self._aliases = ckpt, aliases

    def names(self) -> list[str]:
        """Stored names under their canonical spelling (names outside every alias unchanged)."""
        out = []
        for n in self._ckpt.names():
            for canonical, stored in self._aliases:
                if n.startswith(stored):
                    n = canonical + n[len(stored):]
                    break
            out.append(n)
        return out

    def __getattr__(self, attr: str):
        return getattr(self._ckpt, attr)
