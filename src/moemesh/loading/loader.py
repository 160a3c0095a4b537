"""load_model: a name, a GGUF file or an HF checkpoint directory -> a ready Transformer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..layers.moe import ExpertProvider
from ..models.args import ModelArgs
from ..models.build import make_builder
from ..models.transformer import Transformer
from ..sysinfo import trim_heap
from ..weights.page_out import prefault_in_background, row_tables
from ..weights.safetensors_io import SafetensorsCheckpoint
from ..weights.source import SafetensorsSource
from .placement import place_decode_weights
from .source import arch_and_args, open_source, resolve_model_path

if TYPE_CHECKING:
    from ..experts.budget import BudgetPlan
    from ..tokenizer.tokenizer import Tokenizer
    from .experts import ExpertOptions



@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    tokenizer: "Tokenizer | None"
    path: Path
    config: dict
    provider: ExpertProvider | None = None
    budget: "BudgetPlan | None" = None
    images: Any = None  # the checkpoint's image input (ArchSpec.images: prepare(ids, images) -> ids, Media) or None


def load_model(
    name: str, quant: str = "auto", provider: ExpertProvider | None = None, experts: "ExpertOptions | None" = None
) -> LoadedModel:
    """``experts`` chooses how an expert store's experts are held (resident, or lazy under a RAM
    budget); an HF MoE directory asked to run lazily is converted into a store on first use."""
    from ..store.expert_store import ExpertStore, is_store
    from .experts import ExpertOptions, build_from_store

    path = resolve_model_path(name)
    opts = experts or ExpertOptions()
    lazy = opts.ram is not None or opts.slots is not None
    if lazy and (path.is_file() or not is_store(path)):
        loaded = load_file_lazy(path, quant, opts)  # experts read straight from the model's own files
        if loaded is not None:
            return loaded
        path = cached_store(path, quant)  # auto: the experts as the file holds them
    if path.is_dir() and is_store(path):
        store = ExpertStore(path)
        model, prov, budget = build_from_store(store, quant, opts)
        if not lazy:  # every expert resident: the row tables' pages too
            prefault_in_background(row_tables(model))
        trim_heap()
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            from ..tokenizer.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(path)
        return LoadedModel(model, model.args, tokenizer, path, store.config, prov, budget,
                           image_input(store.config, SafetensorsSource(SafetensorsCheckpoint(path)), path))
    config, source, tokenizer = open_source(path)
    spec, args = arch_and_args(path, config)
    model = make_builder(spec, args, source, quant, trunk_of=path).build(provider)
    place_decode_weights(model, release=source.release_view)  # huge pages, block-major scales; each copied view's file pages go
    # the pages the load read but the model no longer views (float weights it converted; a GGUF's experts and
    # trunk moved into huge pages, which for a whole Q4_K Qwen3-30B-A3B left ~10 GB mapped beside their copies)
    source.ckpt.release_unused(model)
    prefault_in_background(row_tables(model))  # (everything resident: the row tables' pages too)
    trim_heap()
    return LoadedModel(model, args, tokenizer, path, config, provider, images=image_input(config, source, path))


def image_input(config: dict, source, path: Path) -> Any:
    """The family's image path (built lazily on the first image), or None."""
    from ..models import get_arch

    spec = get_arch(config["model_type"])
    return None if spec.images is None or not path.is_dir() else spec.images(config, spec.source(source), path)


def load_file_lazy(path: Path, quant: str, opts: "ExpertOptions") -> LoadedModel | None:
    """Lazy experts read straight from the model's own files (a GGUF's stacked expert tensors, an
    HF directory's safetensors), the trunk from the same files; None when its experts cannot be
    computed in place (F16 experts, fused gate_up tensors, or an explicit --quant conversion): the
    caller converts it into an expert store instead."""
    import sys

    from .experts import build_lazy
    from .file_experts import file_expert_source, gguf_locator, safetensors_locator

    config, source, tokenizer = open_source(path)
    spec, args = arch_and_args(path, config)
    if not args.moe_layers:
        return None
    why = f"--quant {quant} converts the experts" if quant != "auto" else ""
    experts = None
    gguf = path.is_file()
    if not why:
        locator = gguf_locator(source.ckpt) if gguf else safetensors_locator(source.ckpt)
        experts, why = file_expert_source(spec, args, *locator)
    if experts is None:
        print(f"moemesh: {path.name}: lazy experts need an expert store ({why}); converting once", file=sys.stderr)
        return None
    builder = make_builder(spec, args, source, quant, trunk_of=path)
    model, prov, budget = build_lazy(builder, experts, opts, source.ckpt.release_unused, embed_resident=gguf)
    trim_heap()
    return LoadedModel(model, args, tokenizer, path, config, prov, budget)


def cached_store(src: Path, quant: str) -> Path:
    """The store converted from ``src`` (made on first use) under ~/.cache/moemesh/stores."""
    import hashlib
    import os

    from .convert import convert

    stat = (src if src.is_file() else src / "config.json").stat()
    trunk = "int4" if quant == "int4" else "keep"  # an int4 run reads an int4 trunk: no float trunk mapped in
    layout = f"trunk-{trunk}-v2"  # v2: the int4 trunk includes the head's table
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_mtime_ns}|{quant}|{layout}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh")) / "stores"
    out = root / f"{src.name}-{quant}-{key}"
    if not out.exists():
        root.mkdir(parents=True, exist_ok=True)
        convert(src, out, quant, trunk_quant=trunk)
    return out
