"""The on-disk expert store: a trunk, one aligned blob per (layer, expert), a versioned manifest.

```
STORE/
  manifest.json       format, version, HF config, quant, blob layout, offsets, a checksum per blob
  trunk.safetensors   every non-expert tensor under its HF name
  experts.bin         blobs at multiples of ALIGN; blob = gate_up and down QuantLinear buffers
  tokenizer files     copied from the source, when it had them
```

Experts that are not a plain GatedMLP say so in an optional manifest key, ``expert_module``
(gpt_oss: clamped SwiGLU with its alpha and limit), and a linear with a bias stores it as one
more fp32 part (``"bias": true`` in its meta); stores without them read as before (still v1).

Every blob of a store has the same layout (``parts``), so one read of ``blob_size`` bytes at a
4096-aligned offset fetches one expert, and the expert is built as tensor views over that buffer.
The store is an ExpertSource (store/expert_source.py) for the lazy cache: one span per expert, the
checksum checked as it lands, each slot's expert built once (a read turns it into another expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.mlp import GatedMLP
from ..quant.qlinear_state import from_state
from ..weights.json_file import read_json
from .checksum import checksum_fn
from .expert_source import ExpertSource, Span
from .manifest import check_manifest

FORMAT = "moemesh-expert-store"
VERSION = 1
PART_ALIGN = 64  # every tensor inside a blob starts 64-byte aligned (the int8 kernel's loads)
DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Part:
    """One tensor inside every blob: which linear ('gate_up' | 'down'), which buffer, where."""

    linear: str
    buffer: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class ExpertStore(ExpertSource):
    """An opened, validated store. ``expert_from_buffer`` turns blob bytes into a GatedMLP."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        m = read_json(manifest_path, f"{self.root}: not an expert store (no manifest.json)", "corrupt manifest")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest")
        if m.get("version") != VERSION:
            raise CheckpointError(f"{manifest_path}: store format version {m.get('version')} (this moemesh reads {VERSION})")
        experts = self.root / m["experts_file"] if isinstance(m.get("experts_file"), str) else None
        check_manifest(manifest_path, m, experts.stat().st_size if experts is not None and experts.is_file() else None)
        self.manifest: dict[str, Any] = m
        self.config: dict[str, Any] = m["config"]
        self.quant: str = m["quant"]
        self.act: str = m["hidden_act"]
        # optional (gpt_oss): {"kind": "clamped_swiglu", "alpha", "limit"}; absent: a plain GatedMLP
        self.expert_module: dict[str, Any] | None = m.get("expert_module")
        if self.expert_module is not None and self.expert_module.get("kind") != "clamped_swiglu":
            raise CheckpointError(f"{manifest_path}: unknown expert module {self.expert_module.get('kind')!r}")
        self.blob_size: int = m["blob_size"]
        self.linear_meta: dict[str, dict] = m["linears"]
        self.parts = [Part(p["linear"], p["buffer"], p["dtype"], tuple(p["shape"]), p["offset"], p["nbytes"]) for p in m["parts"]]
        # layer -> expert -> (offset, checksum); stores without the field use crc32
        self.checksum: str = m.get("checksum", "crc32")
        try:
            self._sum = checksum_fn(self.checksum)
        except ValueError as exc:
            raise CheckpointError(f"{manifest_path}: {exc}") from None
        key = "sum" if "checksum" in m else "crc32"
        self.blobs: dict[int, list[tuple[int, int]]] = {
            int(layer): [(b["offset"], b[key]) for b in blobs] for layer, blobs in m["layers"].items()
        }
        self.experts_path = self.root / m["experts_file"]
        self.trunk_path = self.root / m["trunk_file"]
        self._check_sizes()
        self.files = [self.experts_path]
        self.slot_bytes = self.blob_size
        self.fixed_layout = True  # every blob has one layout: a slot's expert is built once
        self._trial_build(manifest_path)

    def _trial_build(self, manifest_path: Path) -> None:
        """Build and run one expert over a zeroed blob: linears whose meta the kernels refuse fail now, naming
        the manifest, not when the router first picks an expert mid-request."""
        try:
            expert = self.expert_from_buffer(torch.zeros(self.blob_size, dtype=torch.uint8))
            with torch.no_grad():
                expert(torch.zeros(1, self.linear_meta["gate_up"]["in_features"]))  # [1, D]: the kernels check their shapes
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"{manifest_path}: experts cannot be built from this manifest ({exc!r})") from None

    def spans(self, layer: int, expert: int) -> list[Span]:
        return [Span(0, self.offset(layer, expert), 0, self.blob_size, self.blob_size)]

    def finish(self, layer: int, expert: int, slot: memoryview, verify: bool) -> None:
        if verify:
            self.verify(layer, expert, slot)

    def expert_at(self, slot_index: int, slot: torch.Tensor, layer: int, expert: int) -> GatedMLP:
        return self.expert_from_buffer(slot)

    def _check_sizes(self) -> None:
        if not self.experts_path.is_file():
            raise CheckpointError(f"{self.experts_path}: missing expert file")
        size = self.experts_path.stat().st_size
        need = max((off for blobs in self.blobs.values() for off, _ in blobs), default=-self.blob_size) + self.blob_size
        if size < need:
            raise CheckpointError(
                f"{self.experts_path}: truncated store: {size} bytes but the manifest needs {need}; reconvert the model"
            )
        if not self.trunk_path.is_file():
            raise CheckpointError(f"{self.trunk_path}: missing trunk file")

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.blobs)

    @property
    def num_experts(self) -> int:
        return len(next(iter(self.blobs.values())))

    def offset(self, layer: int, expert: int) -> int:
        return self.blobs[layer][expert][0]

    def verify(self, layer: int, expert: int, data: memoryview | bytes) -> None:
        """Raise CheckpointError naming layer and expert when the blob's checksum does not match."""
        if self._sum(data) != self.blobs[layer][expert][1]:
            raise CheckpointError(
                f"{self.experts_path}: checksum mismatch in layer {layer} expert {expert} "
                f"(offset {self.offset(layer, expert)}): the store is corrupt; reconvert the model"
            )

    def expert_from_buffer(self, buf: torch.Tensor) -> GatedMLP:
        """buf: uint8 [>= blob_size] holding one blob; the expert's tensors are views of it."""
        tensors: dict[str, dict[str, torch.Tensor]] = {"gate_up": {}, "down": {}}
        for p in self.parts:
            dtype = DTYPES[p.dtype]
            tensors[p.linear][p.buffer] = buf[p.offset : p.offset + p.nbytes].view(dtype).view(p.shape)
        gate_up = from_state(self.linear_meta["gate_up"], tensors["gate_up"])
        down = from_state(self.linear_meta["down"], tensors["down"])
        if self.expert_module is not None:
            from ..layers.gpt_oss_moe import ClampedSwiGLU

            return ClampedSwiGLU(gate_up, down, self.expert_module["alpha"], self.expert_module["limit"])
        return GatedMLP(gate_up, down, self.act)

    def read_expert(self, layer: int, expert: int, verify: bool = True, into: torch.Tensor | None = None) -> GatedMLP:
        """Plain buffered read of one expert (the resident path) into ``into`` (uint8 [blob_size],
        e.g. a piece of a HugePageArena), or into its own memory."""
        buf = torch.empty(self.blob_size, dtype=torch.uint8) if into is None else into  # [blob_size]
        view = memoryview(buf.numpy()).cast("B")
        with open(self.experts_path, "rb") as f:
            f.seek(self.offset(layer, expert))
            got = f.readinto(view)
        if got != self.blob_size:
            raise CheckpointError(f"{self.experts_path}: layer {layer} expert {expert} is cut short "
                                  f"({got} of {self.blob_size} bytes): the store is truncated; reconvert the model")
        if verify:
            self.verify(layer, expert, view)
        return self.expert_from_buffer(buf)

    def expert_bytes(self) -> int:
        return self.blob_size * sum(len(b) for b in self.blobs.values())


def is_store(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "trunk.safetensors").is_file()
