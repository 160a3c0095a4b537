"""The model's recommended sampling settings, applied where a request leaves a field out (as vLLM
does with ``--generation-config auto``): ``generation_config.json`` of an HF directory (or an
expert store, which keeps a copy), or the ``general.sampling.*`` keys of a GGUF file."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# our field <- generation_config.json key, GGUF metadata key
_KEYS = {
    "temperature": ("temperature", "general.sampling.temp"),
    "top_p": ("top_p", "general.sampling.top_p"),
    "top_k": ("top_k", "general.sampling.top_k"),
    "min_p": ("min_p", "general.sampling.min_p"),
    "repetition_penalty": ("repetition_penalty", "general.sampling.penalty_repeat"),
}


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    source: str | None = None  # the file they came from (None: the model recommends nothing)

    def values(self) -> dict[str, float | int]:
        """The fields the model sets, without ``source``."""
        return {k: v for k, v in asdict(self).items() if k != "source" and v is not None}


def _number(value: Any, field: str) -> float | int | None:
    """A usable value, or None: HF writes the library defaults (temperature 1.0, top_k 50) only when
    they were changed, but some files hold nulls or junk; a nonsense value is ignored, not fatal."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if field == "top_k":
        return int(value) if value >= 0 and value == int(value) else None
    if field in ("top_p", "min_p") and not 0 <= value <= 1:
        return None
    if value < 0 or (field == "repetition_penalty" and value == 0):
        return None
    return float(value)


def read_sampling_defaults(path: Path) -> SamplingDefaults:
    """What ``path`` (a GGUF file, an HF directory or an expert store) recommends."""
    found: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".gguf":
        from ..weights.gguf_reader import open_gguf_file

        try:
            gguf = open_gguf_file(path)
        except CheckpointError:
            return SamplingDefaults()
        for field, (_, key) in _KEYS.items():
            found[field] = _number(gguf.metadata(key), field)
        source = str(path)
    else:
        file = path / "generation_config.json"
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            return SamplingDefaults()
        if not isinstance(config, dict):
            return SamplingDefaults()
        for field, (key, _) in _KEYS.items():
            found[field] = _number(config.get(key), field)
        source = str(file)
    kept = {k: v for k, v in found.items() if v is not None}
    if "top_k" in kept:
        kept["top_k"] = int(kept["top_k"])
    return SamplingDefaults(**kept, source=source if kept else None)
