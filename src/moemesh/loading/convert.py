"""``moemesh convert``: an HF MoE checkpoint or a GGUF -> an expert store, streamed and atomic.

Tensors are taken one at a time from mmap views, each expert is quantized and written as one
aligned blob, and the store is assembled in a temporary directory that is renamed into place
only after every file is fsync'ed and the manifest written: an interrupted conversion never
leaves a directory that looks like a valid store.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import MoemeshError
from ..experts.lazy import LazyExperts
from ..models import get_arch
from ..models.build import make_builder
from ..models.spec import ArchSpec
from ..quant.blocks import BlockLinear, supported_qtypes
from ..quant.qlinear import QuantLinear
from ..quant.qlinear_state import export_state
from ..store.checksum import DEFAULT as CHECKSUM
from ..store.checksum import checksum_fn
from ..store.expert_source import ALIGN
from ..store.expert_store import FORMAT, PART_ALIGN, VERSION, dtype_name
from ..weights.safetensors_io import write_safetensors
from ..weights.source import BLOCKS
from .source import open_source

STORE_QUANTS = ("auto", "int4", "int8", "bf16", "fp32")  # auto: as the file holds them (block rows, floats as fp32)
TRUNK_QUANTS = ("keep", "int4")  # the trunk's linears as the source has them, or int4 (weights/int4_trunk.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def expert_linears(spec: ArchSpec, source, layer: int, expert: int, quant: str) -> dict[str, QuantLinear | BlockLinear]:
    if (own := spec.expert_linears(source, layer, expert, quant)) is not None:  # gpt_oss: fused tensors, biases
        return own
    names = spec.expert(layer, expert)
    blocks = getattr(source, "blocks", None)
    if quant == "auto" and blocks is not None:  # the file's block rows, as the resident build keeps them
        rows = [blocks(n) for n in names]
        if all(r is not None and r[0] in supported_qtypes() for r in rows) and rows[0][0] == rows[1][0]:
            (qt, gate, k), (_, up, _), (dqt, down, inter) = rows
            return {"gate_up": BlockLinear(qt, torch.cat([gate, up]), k), "down": BlockLinear(dqt, down, inter)}
    if quant == "int4":  # GGUF Q4_0/Q4_1 experts go into the store as they are, not requantized
        groups = [source.int4_groups(n) for n in names]
        if all(g is not None for g in groups):
            (gq, gs, gm), (uq, us, um), down = groups
            return {"gate_up": QuantLinear.from_int4_groups(torch.cat([gq, uq]), torch.cat([gs, us]),
                                                            torch.cat([gm, um]), None),
                    "down": QuantLinear.from_int4_groups(*down, None)}
    gate, up, down = (source.get(n).float() for n in names)
    mode = "fp32" if quant == "auto" else quant
    return {"gate_up": QuantLinear.from_float(torch.cat([gate, up]), None, mode),
            "down": QuantLinear.from_float(down, None, mode)}


def blob_layout(linears: dict[str, QuantLinear]) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(per-linear meta, parts, padded blob size) of one expert; identical for every expert."""
    metas, parts, offset = {}, [], 0
    for lname, layer in linears.items():
        meta, tensors = export_state(layer)
        metas[lname] = meta
        for bname, t in tensors.items():
            n = t.numel() * t.element_size()
            parts.append({"linear": lname, "buffer": bname, "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                          "offset": offset, "nbytes": n})
            offset = _round_up(offset + n, PART_ALIGN)
    return metas, parts, _round_up(offset, ALIGN)


def pack_blob(linears: dict[str, QuantLinear], parts: list[dict[str, Any]], blob_size: int) -> bytearray:
    blob = bytearray(blob_size)
    states = {name: export_state(layer)[1] for name, layer in linears.items()}
    for p in parts:
        t = states[p["linear"]][p["buffer"]]
        if list(t.shape) != p["shape"] or dtype_name(t.dtype) != p["dtype"]:
            raise MoemeshError(f"expert tensor {p['linear']}.{p['buffer']} changed layout ({list(t.shape)} vs {p['shape']})")
        blob[p["offset"] : p["offset"] + p["nbytes"]] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return blob


def convert(src: str | Path, out: str | Path, quant: str = "int4", progress: bool = True,
            trunk_quant: str = "keep") -> Path:
    if quant not in STORE_QUANTS:
        raise MoemeshError(f"--quant must be one of {STORE_QUANTS}, got {quant!r}")
    if trunk_quant not in TRUNK_QUANTS:
        raise MoemeshError(f"--trunk-quant must be one of {TRUNK_QUANTS}, got {trunk_quant!r}")
    src, out = Path(src), Path(out)
    if out.exists():
        raise MoemeshError(f"{out} already exists; remove it or choose another output directory")
    if not src.exists():
        raise MoemeshError(f"{src}: no such checkpoint (convert reads an HF checkpoint directory or a GGUF file)")
    config, source, tokenizer = open_source(src)
    spec = get_arch(config["model_type"])
    args = spec.args_from_config(config)
    source = spec.source(source)  # canonical names (multimodal checkpoints nest the text model)
    if not args.moe_layers:
        raise MoemeshError(f"{src}: {args.model_type} has no MoE layers; there are no experts to store")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_store(src, tmp, config, spec, args, source, quant, progress, trunk_quant)
        if src.is_file() and tokenizer is not None:  # a GGUF keeps its tokenizer in metadata
            tokenizer.save_dir(tmp)
        os.rename(tmp, out)  # atomic: the store appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def trunk_tensors(spec, args, source, expert_names: set[str], trunk_quant: str, quant: str = "int4") -> list[tuple[str, torch.Tensor]]:
    """Every non-expert tensor under its HF name; with trunk_quant int4 each linear weight as its
    three int4 tensors instead (GGUF 4-bit groups as read, float weights quantized like at load);
    under --quant auto a GGUF's block-format tensors keep their rows (NAME.blocks.QTYPE), an FP8
    checkpoint's weights their e4m3 tensors and scales."""
    from ..quant import fp8, int4_trunk

    linears = linear_names(spec, args, source) if trunk_quant == "int4" else set()
    head = head_table_name(source, args) if trunk_quant == "int4" else None
    out = []
    for n in source.ckpt.names():
        if n in expert_names or unused_layer(n, args.num_layers):
            continue
        blocks = getattr(source, "blocks", lambda _: None)(n) if trunk_quant == "keep" and quant == "auto" else None
        if blocks is not None and (groups := source.int4_groups(n)) is not None:  # Q4_0/Q4_1: the int4 kernel's
            out += [(n + sfx, v) for sfx, v in int4_trunk.from_groups(groups).items()]  # groups, as a load gives
            continue
        if blocks is not None and blocks[0] == fp8.QTYPE:  # e4m3 as stored (its NAME_scale_inv is copied too):
            out.append((n, source.ckpt.get(n)))  # padded rows would lose K, which the pair keeps
            continue
        if blocks is not None and blocks[0] in supported_qtypes():
            out.append((f"{n}{BLOCKS}{blocks[0]}", blocks[1]))  # the GGUF's rows as they are (BlockLinear at load)
            continue
        groups = source.int4_groups(n) if n in linears else None
        if groups is not None:  # GGUF 4-bit groups: stored as read
            out += [(n + sfx, v) for sfx, v in int4_trunk.from_groups(groups).items()]
            continue
        t = source.get(n)
        if n != head and (n not in linears or not int4_trunk.quantizable(t)):
            out.append((n, t))
            continue
        if n == head:  # the float table stays (embedding rows, exact rescoring) beside its int4 copy
            out.append((n, t))
        if int4_trunk.quantizable(t):
            out += [(n + sfx, v) for sfx, v in int4_trunk.quantize(t).items()]
    return out


def unused_layer(name: str, num_layers: int) -> bool:
    """Multi-token-prediction layers no decode step runs: ``mtp.*`` (Qwen3.5) or decoder layers past
    num_hidden_layers (GLM-4.5, DeepSeek-V3 keep theirs as model.layers.N), experts included."""
    if name.startswith("mtp."):
        return True
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= num_layers


def _write_store(src, tmp, config, spec, args, source, quant, progress, trunk_quant="keep") -> None:
    expert_names = {n for i in args.moe_layers for n in spec.expert_tensor_names(i, args.num_experts)}
    trunk = trunk_tensors(spec, args, source, expert_names, trunk_quant, quant)
    write_safetensors(tmp / "trunk.safetensors", trunk)
    del trunk
    first = expert_linears(spec, source, args.moe_layers[0], 0, quant)
    metas, parts, blob_size = blob_layout(first)
    layers: dict[str, list[dict[str, int]]] = {}
    total = len(args.moe_layers) * args.num_experts
    bar = tqdm(total=total, desc="experts", unit="expert", disable=not progress)
    offset = 0
    blob_sum = checksum_fn(CHECKSUM)
    with open(tmp / "experts.bin", "wb") as f:
        for i in args.moe_layers:
            entries = []
            for e in range(args.num_experts):
                linears = first if (i, e) == (args.moe_layers[0], 0) else expert_linears(spec, source, i, e, quant)
                blob = pack_blob(linears, parts, blob_size)
                f.write(blob)
                entries.append({"offset": offset, "sum": blob_sum(blob)})
                offset += blob_size
                bar.update(1)
            layers[str(i)] = entries
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    for name in TOKENIZER_FILES if src.is_dir() else ():
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    manifest = {
        "format": FORMAT, "version": VERSION, "model_type": args.model_type, "config": config, "quant": quant,
        "checksum": CHECKSUM, "trunk_quant": trunk_quant,
        "hidden_act": args.hidden_act, "alignment": ALIGN, "blob_size": blob_size, "linears": metas, "parts": parts,
        "trunk_file": "trunk.safetensors", "experts_file": "experts.bin", "layers": layers,
    }
    if (module := spec.expert_module(args)) is not None:  # not a plain GatedMLP (gpt_oss)
        manifest["expert_module"] = module
    with open(tmp / "manifest.json", "w") as f:  # written last: its presence marks a finished store
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def head_table_name(source, args) -> str:
    """The table the output head scores against: lm_head.weight, or the embedding when tied."""
    tied = args.tie_word_embeddings or not source.has("lm_head.weight")
    return "model.embed_tokens.weight" if tied else "lm_head.weight"


def linear_names(spec, args, source) -> set[str]:
    """The HF names the builder turns into QuantLinears for this architecture (the trunk's linears):
    recorded by building the trunk once (experts are not built: MoE layers get an empty provider)."""
    builder = make_builder(spec, args, source, "int4")
    names: set[str] = set()
    build_linear = builder.linear

    def recording(ns: list[str], bias_names: list[str] | None = None, expert: bool = False):
        names.update(ns)
        return build_linear(ns, bias_names, expert=expert)

    builder.linear = recording
    builder.build(LazyExperts(cache=None))  # type: ignore[arg-type]
    return names
