"""Parameter and byte counts of an MoE model, from its HF config dict alone.

A model is described as linears and small tensors, split the way moemesh holds them:

* trunk: attention, dense MLPs, shared experts, routers, norms (always resident, read every token)
* experts: one routed expert = a fused gate_up linear and a down linear (one blob in the store)
* embedding table (mmap'ed; a token reads one row) and output head

The shape itself (which linears) is the architecture family's (models/shape.py, ArchSpec.shape).
Byte counts per weight format follow QuantLinear exactly (int4: group 32, bf16 scale and zero per
group, rows padded to 16; int8: one fp32 scale per row; biases fp32) and the expert store's blob
layout (parts 64-byte aligned, blobs 4096-aligned); tests compare them with the real objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArchitecture
from ..models.shape import Linear, ModelShape

FORMATS = ("bf16", "int8", "int4")  # what moemesh converts to (QuantLinear)
# formats computed as stored (quant.blocks.BlockLinear): (weights per block, bytes per block), GGML_QUANT_SIZES
# for the GGUF types, 132 per 128 for FP8 e4m3 with its 128x128 block scales (quant/fp8.py)
NATIVE = {"MXFP4": (32, 17), "Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144),
          "Q3_K": (256, 110), "Q2_K": (256, 84), "IQ4_XS": (256, 136), "Q4_0": (32, 18), "FP8": (128, 132)}
DECODED_TABLES = ("Q8_0", "Q4_0")  # embedding/head tables decoded whole to fp32 (models/build.py TENSOR_TABLES)
INT4_GROUP, INT4_N_MULTIPLE, INT8_K_MULTIPLE = 32, 16, 16  # as layers/qlinear.py
PART_ALIGN, BLOB_ALIGN = 64, 4096  # as experts/store.py


# ---------------------------------------------------------------------- bytes per format
def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def native_fits(lin: Linear, fmt: str) -> bool:
    """A native block format needs rows that are whole blocks (FP8 pads its last block)."""
    return fmt == "FP8" or lin.n_in % NATIVE[fmt][0] == 0


def stored_mode(lin: Linear, fmt: str) -> str:
    """What QuantLinear.from_float stores for a requested format (int4 -> int8 -> bf16 fallbacks); a
    native format keeps its blocks, or Q8_0 where a row is not whole blocks (llama.cpp's quantizer
    falls back likewise, e.g. gpt-oss's 2880-wide rows have no K-quant)."""
    if fmt in NATIVE:
        return fmt if native_fits(lin, fmt) else ("Q8_0" if lin.n_in % NATIVE["Q8_0"][0] == 0 else "bf16")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS + tuple(NATIVE)}, got {fmt!r}")
    if fmt == "int4" and lin.n_in % INT4_GROUP == 0:
        return "int4"
    if fmt in ("int4", "int8") and lin.n_in % INT8_K_MULTIPLE == 0:
        return "int8"
    return "bf16"


def linear_parts(lin: Linear, fmt: str) -> list[int]:
    """Byte sizes of the buffers QuantLinear.from_float(w, bias, fmt) holds (with its fallbacks)."""
    n, k = lin.n_out, lin.n_in
    bias = [4 * n] if lin.bias else []
    mode = stored_mode(lin, fmt)
    if mode in NATIVE:
        block, size = NATIVE[mode]
        return [n * -(-k // block) * size] + bias
    if mode == "int4":
        n_pad = _round_up(n, INT4_N_MULTIPLE)
        return [n_pad * k // 2, (k // INT4_GROUP) * n_pad * 2 * 2] + bias  # packed nibbles, bf16 scale+zero
    if mode == "int8":
        return [n * k, 4 * n] + bias
    return [2 * n * k] + bias


def linear_bytes(lin: Linear, fmt: str) -> int:
    return sum(linear_parts(lin, fmt))


def resident_linear_bytes(lin: Linear, fmt: str) -> int:
    """linear_bytes plus the int8 kernel's bf16 ones vector (a non-persistent buffer, not in blobs)."""
    return linear_bytes(lin, fmt) + (2 * lin.n_out if fmt not in NATIVE and stored_mode(lin, fmt) == "int8" else 0)


def blob_bytes(shape: ModelShape, fmt: str) -> int:
    """One expert's blob in the store: every part 64-byte aligned, the blob 4096-aligned."""
    offset = 0
    for lin in shape.expert_linears:
        for nbytes in linear_parts(lin, fmt):
            offset = _round_up(offset + nbytes, PART_ALIGN)
    return _round_up(offset, BLOB_ALIGN)


@dataclass
class FormatBytes:
    fmt: str
    disk: int  # the store: trunk as bf16 + one blob per expert
    trunk_disk: int
    trunk_ram: int  # resident trunk (embedding mmap'ed, not counted; head quantized to fmt)
    expert: int  # one blob
    experts: int  # all blobs
    active: int  # bytes read from memory per decode token (trunk + head + top-k blobs per MoE layer)


def format_bytes(shape: ModelShape, fmt: str) -> FormatBytes:
    """A native format: the model as a GGUF of that type read in place (trunk, head and table in it too;
    Q8_0/Q4_0 tables are decoded to fp32 at load); the others: moemesh's expert store."""
    blob = shape.stored_blobs.get(fmt) or blob_bytes(shape, fmt)
    n_blobs = shape.moe_layers * shape.num_experts
    trunk_disk = 2 * shape.trunk_params
    head = resident_linear_bytes(shape.head, fmt)
    if fmt in NATIVE:
        table = Linear(shape.vocab_size, shape.hidden_size)
        trunk_disk = (sum(linear_bytes(lin, fmt) for lin in shape.trunk_linears) + 4 * shape.small_params
                      + linear_bytes(table, fmt) + (0 if shape.tied else linear_bytes(shape.head, fmt)))
        if stored_mode(table, fmt) in DECODED_TABLES:  # the table decoded to fp32 (and an untied head too)
            head = 4 * shape.vocab_size * shape.hidden_size * (1 if shape.tied else 2)
        else:  # the head computes over its block rows; the table's rows are decoded per lookup
            head = linear_bytes(table if shape.tied else shape.head, fmt)
    trunk_ram = sum(resident_linear_bytes(lin, fmt) for lin in shape.trunk_linears) + 4 * shape.small_params + head
    active = trunk_ram + shape.moe_layers * shape.top_k * blob + 2 * shape.hidden_size  # + one embedding row
    return FormatBytes(fmt, trunk_disk + n_blobs * blob, trunk_disk, trunk_ram, blob, n_blobs * blob, active)


# ---------------------------------------------------------------------- config dict -> ModelShape
def shape_from_config(cfg: dict[str, Any], name: str = "") -> ModelShape:
    """A ModelShape from an HF config.json dict, as the family declares it (ArchSpec.shape);
    UnsupportedArchitecture for unknown model types or configs the family cannot read."""
    from ..models import ARCHITECTURES

    mt = cfg.get("model_type")
    spec = ARCHITECTURES.get(str(mt))
    if spec is None:
        raise UnsupportedArchitecture(f"moemesh plan cannot size model_type {mt!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    try:
        return spec.shape(spec.args_from_config(cfg), cfg, name or str(mt))
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedArchitecture(f"config of model_type {mt!r} lacks or garbles a size field: {exc}") from None
