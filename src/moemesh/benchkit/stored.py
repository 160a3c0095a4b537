"""Stored: exact figures read from a model's files (for ``moemesh plan``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stored:
    """Exact figures from the files themselves (None for a built-in name or a bare config)."""

    kind: str  # "hf-checkpoint" | "expert-store" | "gguf"
    files: int
    tensor_bytes: int  # sum of every tensor's data, as stored
    expert_bytes: int  # routed experts' share of tensor_bytes
    params: int  # elements over all tensors (GGUF: logical elements)
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> bytes
    blob_size: int | None = None  # expert store: one blob
    quant: str | None = None  # expert store: the blobs' format (int4 | int8 | bf16)
    native: list[str] = field(default_factory=list)  # formats the files hold the experts in (MXFP4, Q4_K, FP8 ...)
    native_expert_bytes: int | None = None  # GGUF: one expert's bytes as the file holds it (mean over layers)
