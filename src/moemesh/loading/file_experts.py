"""Lazy experts straight from the model's own file: where each expert's tensors lie (GGUF stacked
``ffn_*_exps`` slices, or safetensors tensors) -> a store.file_experts.FileExpertSource, and how
the bytes of its runs become the expert module (BlockLinear rows at their stored format, fp32
weights as views, fp32 biases). The family says which tensors make an expert
(``ArchSpec.expert_layout``); the format comes from the file. An FP8 checkpoint's e4m3 experts
(DeepSeek-V3/R1: ``weight`` + ``weight_scale_inv``) -> a store.fp8_file_experts.Fp8FileExpertSource,
which packs them into quant/fp8.py's rows in the slot.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..layers.gpt_oss_moe import ClampedSwiGLU
from ..layers.mlp import GatedMLP
from ..models.args import ModelArgs
from ..models.spec import ArchSpec
from ..quant import fp8
from ..quant.blocks import BlockLinear, row_bytes, supported_qtypes
from ..quant.qlinear import QuantLinear
from ..quant.qlinear_state import from_state
from ..store.file_experts import FileExpertSource, Piece
from ..store.fp8_file_experts import Fp8FileExpertSource, Fp8Piece
from ..weights.source import FP8_SCALE

FLOAT_IN_PLACE = ("F32", "BF16")  # float formats computed from the file's bytes as they are (QuantLinear views)
TORCH_FORMATS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}
SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # widened exactly, as fp8.pack does
E4M3 = "F8_E4M3"


@dataclass(frozen=True)
class Located:
    """Where one tensor's bytes are: ``nbytes`` at ``offset`` of ``file``; ``fmt`` a block qtype name
    (BlockLinear's) or a float type ("F32", "F16", "BF16")."""

    file: Path
    offset: int
    nbytes: int
    fmt: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LinearFormat:
    fmt: str
    rows: int
    in_features: int
    bias: bool


def usable(fmt: str) -> bool:
    return fmt in supported_qtypes() or fmt in FLOAT_IN_PLACE


def expert_linear(f: LinearFormat, weight: torch.Tensor, bias: torch.Tensor | None) -> BlockLinear | QuantLinear:
    """A linear over the run's bytes (views, never a copy)."""
    b = None if bias is None else bias.view(torch.float32)  # [rows]
    if f.fmt in FLOAT_IN_PLACE:
        dtype, mode = (torch.float32, "fp32") if f.fmt == "F32" else (torch.bfloat16, "bf16")
        meta = {"mode": mode, "in_features": f.in_features, "out_features": f.rows, "group_size": 0,
                "int4_layout": None, "bias": b is not None}
        return from_state(meta, {"weight": weight.view(dtype).view(f.rows, f.in_features), "bias": b})
    return BlockLinear(f.fmt, weight.view(f.rows, row_bytes(f.fmt, f.in_features)), f.in_features, b)


def expert_module(spec: ArchSpec, args: ModelArgs, gate_up, down) -> GatedMLP:
    kind = spec.expert_module(args)
    if kind is not None and kind.get("kind") == "clamped_swiglu":
        return ClampedSwiGLU(gate_up, down, kind["alpha"], kind["limit"])
    return GatedMLP(gate_up, down, args.hidden_act)


def file_expert_source(spec: ArchSpec, args: ModelArgs, files: list[Path], has: Callable[[str], bool],
                       locate: Callable[[str], Located]) -> tuple[FileExpertSource | None, str]:
    """(the source, "") or (None, why not): an expert whose tensors are in a format the kernels cannot
    compute in place (F16/BF16 GGUF experts ...) or not separate tensors (fused gate_up)."""
    index = {p: i for i, p in enumerate(files)}
    first = spec.expert_layout(args.moe_layers[0], 0, has)
    if first is not None and locate(first[0][0][0]).fmt == E4M3:
        return fp8_expert_source(spec, args, files, has, locate)
    pieces: dict[tuple[int, int], list[list[Piece]]] = {}
    formats: dict[int, list[LinearFormat]] = {}
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            layout = spec.expert_layout(layer, e, has)
            if layout is None:
                return None, f"{spec.model_type} experts are stored fused (gate_up) in this checkpoint"
            weights, biases, fmts = [], [], []
            for w_names, b_names in layout:
                locs = [locate(n) for n in w_names]
                fmt = {loc.fmt for loc in locs}
                if len(fmt) != 1 or not usable(next(iter(fmt))):
                    return None, f"expert tensors {w_names} are {sorted(fmt)}, not computed in place"
                rows = sum(loc.shape[0] for loc in locs)
                fmts.append(LinearFormat(locs[0].fmt, rows, locs[0].shape[-1], b_names is not None))
                weights.append([Piece(index[loc.file], loc.offset, loc.nbytes) for loc in locs])
                if b_names is not None:
                    blocs = [locate(n) for n in b_names]
                    if any(b.fmt != "F32" for b in blocs):
                        return None, f"expert biases {b_names} are not F32"
                    biases.append([Piece(index[b.file], b.offset, b.nbytes) for b in blocs])
            if formats.setdefault(layer, fmts) != fmts:
                return None, f"layer {layer}'s experts differ in format"
            pieces[layer, e] = weights + biases

    def build(layer: int, runs: list[torch.Tensor]) -> GatedMLP:
        fmts = formats[layer]
        bias_runs = iter(runs[len(fmts):])
        linears = [expert_linear(f, runs[k], next(bias_runs) if f.bias else None) for k, f in enumerate(fmts)]
        return expert_module(spec, args, *linears)

    return FileExpertSource(files, pieces, build), ""


def fp8_piece(name: str, has: Callable[[str], bool], locate: Callable[[str], Located], index: dict[Path, int]) -> Fp8Piece:
    """An e4m3 expert weight and its block scales; a missing or mis-shaped scale is an error naming
    the file and tensor (at load, before any compute)."""
    w, sname = locate(name), name + FP8_SCALE
    if len(w.shape) != 2:
        raise CheckpointError(f"{w.file}: {name}: an FP8 expert weight must be 2-D, got shape {w.shape}")
    if not has(sname):
        raise CheckpointError(f"{w.file}: {name} is e4m3 but its block scales {sname} are missing")
    s = locate(sname)
    want = (-(-w.shape[0] // fp8.BLOCK), -(-w.shape[1] // fp8.BLOCK))
    if s.shape != want or s.fmt not in SCALE_DTYPES:
        raise CheckpointError(f"{s.file}: {sname} is {s.fmt} {list(s.shape)}; {name} {list(w.shape)} needs a float "
                              f"{list(want)} (one scale per 128x128 block)")
    return Fp8Piece(Piece(index[w.file], w.offset, w.nbytes), Piece(index[s.file], s.offset, s.nbytes),
                    w.shape[0], w.shape[1], SCALE_DTYPES[s.fmt])


def fp8_expert_source(spec: ArchSpec, args: ModelArgs, files: list[Path], has: Callable[[str], bool],
                      locate: Callable[[str], Located]) -> tuple[Fp8FileExpertSource | None, str]:
    """Experts of an FP8 checkpoint (e4m3 weights with 128x128 block scales), packed in their slots
    into the rows the resident build computes, or (None, why not)."""
    index = {p: i for i, p in enumerate(files)}
    pieces: dict[tuple[int, int], list[list[Fp8Piece]]] = {}
    formats: dict[int, list[LinearFormat]] = {}
    for layer in args.moe_layers:
        for e in range(args.num_experts):
            layout = spec.expert_layout(layer, e, has)
            if layout is None or any(b is not None for _, b in layout):
                return None, f"{spec.model_type} FP8 experts are fused or biased in this checkpoint"
            if any(locate(n).fmt != E4M3 for names, _ in layout for n in names):
                return None, f"layer {layer} expert {e} is not all e4m3"
            runs = [[fp8_piece(n, has, locate, index) for n in names] for names, _ in layout]
            fmts = [LinearFormat(fp8.QTYPE, sum(p.rows for p in run), run[0].cols, False) for run in runs]
            if any(len({p.cols for p in run}) != 1 for run in runs) or formats.setdefault(layer, fmts) != fmts:
                return None, f"layer {layer}'s FP8 experts differ in shape"
            pieces[layer, e] = runs

    def build(layer: int, runs: list[torch.Tensor]) -> GatedMLP:
        return expert_module(spec, args, *[expert_linear(f, run, None) for f, run in zip(formats[layer], runs)])

    return Fp8FileExpertSource(files, pieces, build), ""


def gguf_locator(ckpt) -> tuple[list[Path], Callable[[str], bool], Callable[[str], Located]]:
    """(files, has, locate) over a loading.gguf_checkpoint.GGUFCheckpoint."""
    def locate(name: str) -> Located:
        info = ckpt.tensor(name).info
        return Located(info.file, info.offset, info.nbytes, info.type_name, info.shape)

    return list(ckpt.file.files), ckpt.tensors.__contains__, locate


def safetensors_locator(ckpt) -> tuple[list[Path], Callable[[str], bool], Callable[[str], Located]]:
    """(files, has, locate) over a weights.safetensors_io.SafetensorsCheckpoint (every shard)."""
    files = [f.path for f in ckpt.files.values()]

    def locate(name: str) -> Located:
        f = ckpt.where[name]
        dtype, shape, begin, end = f.entries[name]
        return Located(f.path, f.data_start + begin, end - begin, TORCH_FORMATS.get(dtype, str(dtype)), tuple(shape))

    return files, ckpt.has, locate
