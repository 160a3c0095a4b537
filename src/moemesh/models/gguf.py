"""The one GGUF translator: how a model family's llama.cpp GGUF maps onto its HF form.

Each family declares a ``GGUFSpec`` next to its ArchSpec (``models/<type>.py``: ``GGUF = ...``):
the GGUF architecture name it reads, its block tensor names -> HF names, its metadata -> HF config,
q/k row orders and tensors assembled from several GGUF ones. ``translate`` turns a GGUF header
(weights.gguf_reader.GGUFFile: names, shapes, metadata) into (spec, HF config, HF name -> GGUF
name and expert index). The loader (loading/gguf_checkpoint.py) and ``moemesh plan``
(benchkit/source.py) both use it, so a family's GGUF knowledge lives in one place.

A layer's experts are one stacked tensor ``blk.N.ffn_{gate,up,down}_exps`` [E, out, in]; their HF
name holds ``{e}`` and each expert is the outermost slice (contiguous bytes: an expert is three
byte ranges of the file).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UnsupportedArchitecture

Meta = Callable[[str, Any], Any]  # metadata getter: (full key, default) -> value
Shapes = dict[str, tuple[int, ...]]  # HF name -> HF shape ([out, in]; experts per expert)

TOP = MappingProxyType({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "rope_freqs": "rope_freqs",  # llama3 rope frequency factors; no HF counterpart, kept as is
})
ATTN = MappingProxyType({
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
})
EXPERTS = MappingProxyType({  # HF per-expert names under the family's MoE prefix
    "ffn_gate_exps": "experts.{e}.gate_proj",
    "ffn_up_exps": "experts.{e}.up_proj",
    "ffn_down_exps": "experts.{e}.down_proj",
})
QK_NORMS = MappingProxyType({"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"})


def moe_block(*parts: Mapping[str, str], router: str = "mlp.gate", attn: Mapping[str, str] = ATTN) -> MappingProxyType:
    """A family's per-layer GGUF -> HF names: ``attn`` and any ``parts``, the router, and the routed
    experts under ``mlp.`` (the layout qwen2/3_moe, olmoe and gpt-oss share)."""
    names: dict[str, str] = {**attn}
    for part in parts:
        names.update(part)
    names["ffn_gate_inp"] = router
    names.update({k: f"mlp.{v}" for k, v in EXPERTS.items()})
    return MappingProxyType(names)


_BLOCK_RE = re.compile(r"blk\.(\d+)\.([\w.]+?)(?:\.(weight|bias))?")  # suffix-less: qwen3next's ssm_a
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class Merge:
    """An HF tensor assembled from several GGUF tensors of one block (deepseek2's kv_b_proj from
    attn_k_b and attn_v_b): ``fn(parts in HF float, config) -> tensor``, ``shape(part shapes)``."""

    parts: tuple[str, ...]  # GGUF block tensor names with suffix, e.g. "attn_k_b.weight"
    fn: Callable[[list[torch.Tensor], dict], torch.Tensor]
    shape: Callable[[list[tuple[int, ...]]], tuple[int, ...]]


def no_permutation(hf_name: str, shape: tuple[int, ...], config: dict) -> None:
    return None


def no_fix(hf_name: str) -> None:
    return None


def _full(m: re.Match) -> str:
    """A block tensor's name within its block, suffix included (``attn_q.weight``, ``ssm_a``)."""
    return m.group(2) if m.group(3) is None else f"{m.group(2)}.{m.group(3)}"


@dataclass(frozen=True)
class GGUFSpec:
    """One family's GGUF reading. ``block`` maps a block tensor's GGUF name to its HF name under
    ``model.layers.N.``: by part (``attn_q`` -> ``self_attn.q_proj``, the suffix kept) or by part
    and suffix (``attn_sinks.weight`` -> ``self_attn.sinks``, exact)."""

    arch: str  # general.architecture
    model_type: str  # the HF model_type it reads as
    block: Mapping[str, str]
    config: Callable[[Meta, Shapes], dict]  # (metadata, HF shapes) -> HF config (model_type set by translate)
    matches: Callable[[Meta], bool] = lambda meta: True  # several families share one GGUF arch (llama/mixtral)
    row_permutation: Callable[[str, tuple[int, ...], dict], np.ndarray | None] = no_permutation
    merges: Mapping[str, Merge] = field(default_factory=dict)  # HF block name (with suffix) -> Merge
    ignored: tuple[str, ...] = ()  # block tensor name prefixes to skip (multi-token-prediction layers)
    # HF name -> a function undoing the converter's change of that tensor's values (same shape), or None
    value_fix: Callable[[str], Callable[[torch.Tensor], torch.Tensor] | None] = no_fix


@dataclass
class Translation:
    """A GGUF header read as its family's HF checkpoint."""

    spec: GGUFSpec
    config: dict
    names: dict[str, tuple[str, int | None]]  # HF name -> (GGUF name, expert index or None)
    merged: dict[str, tuple[list[str], Merge]]  # HF name -> (GGUF names of its parts, how)
    shapes: Shapes


def need(meta: Meta, key: str) -> Any:
    value = meta(key, None)
    if value is None:
        raise CheckpointError(f"GGUF metadata lacks {key}")
    return value


def base_config(arch: str, meta: Meta, shapes: Shapes) -> dict:
    """What every llama-like GGUF says the same way (``{arch}.embedding_length`` ...)."""
    hidden, heads = int(need(meta, f"{arch}.embedding_length")), int(need(meta, f"{arch}.attention.head_count"))
    embed = shapes.get("model.embed_tokens.weight")
    vocab = meta(f"{arch}.vocab_size", None) or (embed[0] if embed else len(meta("tokenizer.ggml.tokens", [])))
    return {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length", 0) or 0),
        "num_hidden_layers": int(need(meta, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "rope_scaling": None,
    }


def moe_config(arch: str, meta: Meta, shapes: Shapes, expert: str) -> dict:
    """Expert count, top-k and expert width (``expert``: an HF expert weight name of layer L, expert 0)."""
    experts = int(meta(f"{arch}.expert_count", 0) or 0)
    if not experts:
        raise CheckpointError(f"GGUF metadata lacks {arch}.expert_count")
    gate = next((s for n, s in shapes.items() if n.endswith(expert)), None)
    return {"num_experts": experts, "num_experts_per_tok": int(need(meta, f"{arch}.expert_used_count")),
            "moe_intermediate_size": int(meta(f"{arch}.expert_feed_forward_length", 0) or (gate[0] if gate else 0))}


def yarn_scaling(arch: str, meta: Meta) -> dict | None:
    """HF rope_scaling for a YaRN GGUF (``{arch}.rope.scaling.*``), else None."""
    if meta(f"{arch}.rope.scaling.type", None) != "yarn":
        return None
    out = {"rope_type": "yarn", "factor": float(need(meta, f"{arch}.rope.scaling.factor")),
           "original_max_position_embeddings": int(need(meta, f"{arch}.rope.scaling.original_context_length"))}
    for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if (v := meta(f"{arch}.rope.scaling.{key}", None)) is not None:
            out[hf] = float(v)
    return out


def rotary_unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's convert-time permute of q/k rows.

    The converter turns each head's [half0 | half1] rotary layout into interleaved pairs:
    W.reshape(n_head, 2, d/2, in).swapaxes(1, 2). HF row r is GGUF row perm[r].
    """
    if n_head <= 0 or n_rows % (2 * n_head):
        raise CheckpointError(f"{n_rows} rows do not split into {n_head} heads of rotary pairs")
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def llama_row_permutation(hf_name: str, shape: tuple[int, ...], config: dict) -> np.ndarray | None:
    # q/k weights and biases alike: rows are grouped per head (n_head for q, n_kv_head for k)
    if ".self_attn.q_proj." in hf_name:
        return rotary_unpermute_rows(shape[0], config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return rotary_unpermute_rows(shape[0], config["num_key_value_heads"])
    return None


def hf_name(spec: GGUFSpec, gguf_name: str) -> str | None:
    """The HF name (``{e}`` for stacked experts) of one GGUF tensor; None: not part of this family."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        part, suffix = m.group(2), m.group(3)
        exact = spec.block.get(_full(m))
        if exact is not None:
            return f"model.layers.{m.group(1)}.{exact}"
        base = spec.block.get(part) if suffix is not None else None
        return None if base is None else f"model.layers.{m.group(1)}.{base}.{suffix}"
    if m := _TOP_RE.fullmatch(gguf_name):
        top = TOP.get(m.group(1))
        return None if top is None else f"{top}.{m.group(2)}"
    return None


def _merge_parts(spec: GGUFSpec) -> dict[str, str]:
    return {p: hf for hf, mg in spec.merges.items() for p in mg.parts}


def translate(spec: GGUFSpec, path: Any, shapes: dict[str, tuple[int, ...]], meta: Meta) -> Translation:
    """``shapes``: GGUF name -> numpy-order shape of every tensor. CheckpointError naming ``path``
    for a tensor the family does not have, a malformed expert stack, or metadata it needs."""
    names: dict[str, tuple[str, int | None]] = {}
    merge_of = _merge_parts(spec)
    pending: dict[str, dict[str, str]] = {}  # merged HF name -> {part: GGUF name}
    for g, shape in shapes.items():
        m = _BLOCK_RE.fullmatch(g)
        if m and m.group(2).startswith(spec.ignored or ("\0",)):
            continue
        if m and _full(m) in merge_of:
            hf = f"model.layers.{m.group(1)}.{merge_of[_full(m)]}"
            pending.setdefault(hf, {})[_full(m)] = g
            continue
        hf = hf_name(spec, g)
        if hf is None:
            raise CheckpointError(f"{path}: tensor {g!r} is not part of a {spec.arch} model")
        if "{e}" in hf:  # [E, out, in] experts (or [E, out] expert biases) -> one tensor per expert
            if len(shape) < 2:
                raise CheckpointError(f"{path}: expert tensor {g!r} is not stacked (shape {list(shape)})")
            for e in range(shape[0]):
                names[hf.format(e=e)] = (g, e)
        else:
            names[hf] = (g, None)
    hf_shapes = {n: shapes[g][1:] if e is not None else shapes[g] for n, (g, e) in names.items()}
    merged: dict[str, tuple[list[str], Merge]] = {}
    for hf, parts in pending.items():
        mg = spec.merges[hf.split(".", 3)[3]]
        if set(parts) != set(mg.parts):
            missing = sorted(set(mg.parts) - set(parts))
            raise CheckpointError(f"{path}: {hf} needs GGUF tensors {missing} of its block as well")
        gnames = [parts[p] for p in mg.parts]
        merged[hf] = (gnames, mg)
        hf_shapes[hf] = mg.shape([shapes[n] for n in gnames])
    try:
        config = spec.config(meta, hf_shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # a zero head count divides by zero
        raise CheckpointError(f"{path}: unusable {spec.arch} metadata ({e!r})") from None
    check_config(path, config)
    config["model_type"] = spec.model_type
    return Translation(spec, config, names, merged, hf_shapes)


POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def check_config(path: Any, config: dict) -> None:
    """The sizes every family divides or allocates by: positive integers (a corrupt header says 0 or 2**64)."""
    for key in POSITIVE:
        value = config.get(key)
        if value is not None and not (isinstance(value, int) and 0 < value < 2**31):
            raise CheckpointError(f"{path}: GGUF metadata gives {key} = {value!r}, not a positive size")


def find_spec(specs: list[GGUFSpec], arch: Any, meta: Meta, path: Any) -> GGUFSpec:
    """The family that reads GGUF architecture ``arch`` with this metadata."""
    for spec in specs:
        if spec.arch == arch and spec.matches(meta):
            return spec
    known = sorted({s.arch for s in specs})
    raise UnsupportedArchitecture(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(known)}")
