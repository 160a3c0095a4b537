"""Parameter and byte counts of an MoE model, from its HF config dict alone.

A model is described as linears and small tensors, split the way moemesh holds them:

* trunk: attention, dense MLPs, shared experts, routers, norms (always resident, read every token)
* experts: one routed expert = a fused gate_up linear and a down linear (one blob in the store)
* embedding table (mmap'ed; a token reads one row) and output head

Byte counts per weight format follow QuantLinear exactly (int4: group 32, bf16 scale and zero per
group, rows padded to 16; int8: one fp32 scale per row; biases fp32) and the expert store's blob
layout (parts 64-byte aligned, blobs 4096-aligned); tests compare them with the real objects.
Supported model types: llama, qwen2_moe, qwen3_moe, mixtral, olmoe, gpt_oss, deepseek_v2/v3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedArchitecture

FORMATS = ("bf16", "int8", "int4")  # what moemesh converts to (QuantLinear)
# formats computed as stored (quant.blocks.BlockLinear): (weights per block, bytes per block), GGML_QUANT_SIZES
# for the GGUF types, 132 per 128 for FP8 e4m3 with its 128x128 block scales (quant/fp8.py)
NATIVE = {"MXFP4": (32, 17), "Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144),
          "Q3_K": (256, 110), "Q2_K": (256, 84), "IQ4_XS": (256, 136), "Q4_0": (32, 18), "FP8": (128, 132)}
DECODED_TABLES = ("Q8_0", "Q4_0")  # embedding/head tables decoded whole to fp32 (models/build.py TENSOR_TABLES)
INT4_GROUP, INT4_N_MULTIPLE, INT8_K_MULTIPLE = 32, 16, 16  # as layers/qlinear.py
PART_ALIGN, BLOB_ALIGN = 64, 4096  # as experts/store.py


@dataclass(frozen=True)
class Linear:
    n_out: int
    n_in: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.n_out * self.n_in + (self.n_out if self.bias else 0)


@dataclass
class ModelShape:
    name: str
    model_type: str
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    vocab_size: int
    hidden_size: int
    trunk_linears: list[Linear] = field(default_factory=list)  # whole model, every token
    expert_linears: list[Linear] = field(default_factory=list)  # one routed expert: [gate_up, down]
    small_params: int = 0  # norms, routers, sinks: kept fp32, read every token
    tied: bool = False
    notes: list[str] = field(default_factory=list)
    # an expert store's real blob size for its quant (e.g. symmetric int4: 10% below blob_bytes' asymmetric count)
    stored_blobs: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ parameters
    @property
    def expert_params(self) -> int:
        return sum(lin.params for lin in self.expert_linears)

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head(self) -> Linear:
        return Linear(self.vocab_size, self.hidden_size)

    @property
    def trunk_params(self) -> int:
        """Everything but the routed experts (embedding and head included)."""
        head = 0 if self.tied else self.head.params
        return sum(lin.params for lin in self.trunk_linears) + self.small_params + self.embed_params + head

    @property
    def total_params(self) -> int:
        return self.trunk_params + self.moe_layers * self.num_experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Per token, counting the embedding table (the Qwen, Mixtral and DeepSeek convention)."""
        return self.active_params_no_embedding + (0 if self.tied else self.embed_params)  # tied: the head is it

    @property
    def active_params_no_embedding(self) -> int:
        """Per token without the embedding table, which a token reads one row of (gpt-oss's convention)."""
        return (sum(lin.params for lin in self.trunk_linears) + self.small_params + self.head.params
                + self.moe_layers * self.top_k * self.expert_params)

    @property
    def active_matmul_params(self) -> int:
        """Weights multiplied per decode token (2 FLOPs each): linears, head and top-k experts."""
        return (sum(lin.n_out * lin.n_in for lin in self.trunk_linears) + self.head.n_out * self.head.n_in
                + self.moe_layers * self.top_k * sum(lin.n_out * lin.n_in for lin in self.expert_linears))


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
def _gated(d: int, inter: int, bias: bool = False) -> list[Linear]:
    return [Linear(2 * inter, d, bias), Linear(d, inter, bias)]  # gate_up fused, down


def _num_experts(cfg: dict[str, Any]) -> int:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            return int(cfg[key])
    return 0


def shape_from_config(cfg: dict[str, Any], name: str = "") -> ModelShape:
    """A ModelShape from an HF config.json dict; UnsupportedArchitecture for unknown model types."""
    mt = cfg.get("model_type")
    if mt not in _BUILDERS:
        raise UnsupportedArchitecture(f"moemesh plan cannot size model_type {mt!r}; known: {', '.join(sorted(_BUILDERS))}")
    try:
        return _BUILDERS[mt](cfg, name or mt)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedArchitecture(f"config of model_type {mt!r} lacks or garbles a size field: {exc}") from None


def _base(cfg: dict[str, Any], name: str, experts: int, top_k: int, moe_layers: list[int]) -> ModelShape:
    return ModelShape(name, cfg["model_type"], int(cfg["num_hidden_layers"]), len(moe_layers), experts, top_k,
                      int(cfg["vocab_size"]), int(cfg["hidden_size"]), tied=bool(cfg.get("tie_word_embeddings", False)))


def _standard(cfg: dict[str, Any], name: str) -> ModelShape:
    """GQA attention + (dense | MoE) gated MLPs: llama, qwen2_moe, qwen3_moe, mixtral, olmoe, gpt_oss."""
    mt = cfg["model_type"]
    d, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    h = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or h)
    hd = int(cfg.get("head_dim") or d // h)
    e = _num_experts(cfg) if mt != "llama" else 0
    k = int(cfg.get("num_experts_per_tok") or 0)
    if mt in ("qwen2_moe", "qwen3_moe"):
        step, dense = int(cfg.get("decoder_sparse_step", 1) or 1), set(cfg.get("mlp_only_layers") or [])
        moe = [i for i in range(layers) if e and i not in dense and (i + 1) % step == 0]
    else:
        moe = list(range(layers)) if e else []
    s = _base(cfg, name, e, k, moe)
    qkv_bias = mt == "qwen2_moe" or bool(cfg.get("attention_bias", False))
    o_bias = mt == "gpt_oss" or (mt != "qwen2_moe" and bool(cfg.get("attention_bias", False)))
    inter = int(cfg.get("intermediate_size") or 0)
    expert_inter = inter if mt in ("mixtral", "olmoe", "gpt_oss") else int(cfg.get("moe_intermediate_size") or 0)
    s.expert_linears = _gated(d, expert_inter, bias=mt == "gpt_oss")
    per_layer_small = 2 * d  # input and post-attention norms
    if mt == "qwen3_moe":
        per_layer_small += 2 * hd
    elif mt == "olmoe":
        per_layer_small += h * hd + kv * hd
    elif mt == "gpt_oss":
        per_layer_small += h  # attention sinks
    for i in range(layers):
        s.trunk_linears += [Linear((h + 2 * kv) * hd, d, qkv_bias), Linear(d, h * hd, o_bias)]
        if i not in moe:
            s.trunk_linears += _gated(d, inter)
            continue
        s.small_params += e * d + (e if mt == "gpt_oss" else 0)  # router (+ its bias)
        if mt == "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
            s.trunk_linears += _gated(d, int(cfg["shared_expert_intermediate_size"]))
            s.small_params += d  # shared_expert_gate: Linear(D, 1)
    s.small_params += layers * per_layer_small + d  # + final norm
    return s


def _deepseek(cfg: dict[str, Any], name: str) -> ModelShape:
    """Multi-head latent attention; dense MLPs before first_k_dense_replace; shared experts."""
    d, layers, h = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    e, k = _num_experts(cfg), int(cfg["num_experts_per_tok"])
    first, freq = int(cfg.get("first_k_dense_replace", 0) or 0), int(cfg.get("moe_layer_freq", 1) or 1)
    moe = [i for i in range(layers) if e and i >= first and i % freq == 0]
    s = _base(cfg, name, e, k, moe)
    nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
    q_rank, kv_rank = cfg.get("q_lora_rank"), int(cfg["kv_lora_rank"])
    bias = bool(cfg.get("attention_bias", False))
    attn = [Linear(kv_rank + rope, d, bias), Linear(h * (nope + v), kv_rank), Linear(d, h * v, bias)]
    small = 2 * d + kv_rank
    if q_rank:
        attn += [Linear(int(q_rank), d, bias), Linear(h * (nope + rope), int(q_rank))]
        small += int(q_rank)
    else:
        attn.append(Linear(h * (nope + rope), d))
    s.expert_linears = _gated(d, int(cfg["moe_intermediate_size"]))
    shared = int(cfg.get("n_shared_experts") or 0) * int(cfg["moe_intermediate_size"])
    correction = e if cfg["model_type"] == "deepseek_v3" or cfg.get("topk_method") == "noaux_tc" else 0
    for i in range(layers):
        s.trunk_linears += attn
        if i in moe:
            s.trunk_linears += _gated(d, shared) if shared else []
            s.small_params += e * d + correction  # router (+ e_score_correction_bias)
        else:
            s.trunk_linears += _gated(d, int(cfg["intermediate_size"]))
    s.small_params += layers * small + d
    if cfg.get("num_nextn_predict_layers"):
        s.notes.append(f"{cfg['num_nextn_predict_layers']} multi-token-prediction layer(s) not counted (decode does not use them)")
    return s


_BUILDERS = {"llama": _standard, "qwen2_moe": _standard, "qwen3_moe": _standard, "mixtral": _standard,
             "olmoe": _standard, "gpt_oss": _standard, "deepseek_v2": _deepseek, "deepseek_v3": _deepseek}
