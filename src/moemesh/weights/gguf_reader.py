"""Open a GGUF checkpoint: HF-style config, HF tensor names, lazy (memory-mapped) dequantization.

The file is mapped, never read whole: a tensor's bytes are touched only when it is dequantized.
Architecture specifics (tensor names, config keys, rotary row order) live in an `ArchSpec`;
add one to `_ARCHS` to support another architecture.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFReader

from moemesh.errors import CheckpointError, UnsupportedArchitecture
from moemesh.weights import gguf_quants

MetaGetter = Callable[[str, Any], Any]


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor's byte range before building views into the map.

    It also parses through a plain-ndarray view of the memmap: same memory, no copy, but it
    skips np.memmap's per-slice bookkeeping, which makes the metadata parse ~3x faster.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path)

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mm: np.memmap) -> None:
        self._mmap = mm  # keeps the mapping alive for the plain view below
        self._plain = mm.view(np.ndarray)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size = len(self._plain)
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                ggml_type = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise CheckpointError(
                    f"{self._path}: tensor {name!r} has unknown ggml type {int(raw_dtype[0])}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if len(dims) and int(dims[0]) % block:
                raise CheckpointError(
                    f"{self._path}: tensor {name!r} has rows of {int(dims[0])}, "
                    f"not a multiple of the {ggml_type.name} block size {block}"
                )
            n_elems = int(np.prod(dims.astype(np.int64))) if len(dims) else 1
            begin = int(start_offs + offset_tensor[0])
            end = begin + n_elems * type_size // block
            if end > file_size:
                raise CheckpointError(
                    f"{self._path}: tensor {name!r} needs bytes {begin}..{end} but the file has only "
                    f"{file_size} bytes (truncated download?)"
                )
        super()._build_tensors(start_offs, fields)


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture maps onto its HF model."""

    name: str
    hf_tensor_name: Callable[[str], str | None]  # GGUF tensor name -> HF name (None: unknown)
    build_config: Callable[[MetaGetter, dict[str, tuple[int, ...]]], dict]  # (meta, HF shapes) -> config
    row_permutation: Callable[[str, tuple[int, ...], dict], np.ndarray | None]  # (HF name, shape, config)


_LLAMA_BLOCK = MappingProxyType({
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
_LLAMA_TOP = MappingProxyType({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "rope_freqs": "rope_freqs",  # llama3 rope frequency factors; no HF counterpart, kept as is
})
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def _llama_tensor_name(gguf_name: str) -> str | None:
    if m := _BLOCK_RE.fullmatch(gguf_name):
        part = _LLAMA_BLOCK.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}.{m.group(3)}"
    if m := _TOP_RE.fullmatch(gguf_name):
        top = _LLAMA_TOP.get(m.group(1))
        return None if top is None else f"{top}.{m.group(2)}"
    return None


def _llama_config(meta: MetaGetter, shapes: dict[str, tuple[int, ...]]) -> dict:
    def need(key: str) -> Any:
        value = meta(f"llama.{key}", None)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    embed = shapes.get("model.embed_tokens.weight")
    vocab = meta("llama.vocab_size", None) or (embed[0] if embed else len(meta("tokenizer.ggml.tokens", [])))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta("llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("llama.context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu",
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "mlp_bias": "model.layers.0.mlp.up_proj.bias" in shapes,
        "rope_scaling": None,
    }
    scaling = meta("llama.rope.scaling.type", None)
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(meta("llama.rope.scaling.factor", 1.0))}
        if (orig := meta("llama.rope.scaling.original_context_length", None)) is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    return config


def rotary_unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's convert-time permute of q/k rows.

    The converter turns each head's [half0 | half1] rotary layout into interleaved pairs:
    W.reshape(n_head, 2, d/2, in).swapaxes(1, 2). HF row r is GGUF row perm[r].
    """
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _llama_row_permutation(hf_name: str, shape: tuple[int, ...], config: dict) -> np.ndarray | None:
    # q/k weights and biases alike: rows are grouped per head (n_head for q, n_kv_head for k)
    if ".self_attn.q_proj." in hf_name:
        return rotary_unpermute_rows(shape[0], config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return rotary_unpermute_rows(shape[0], config["num_key_value_heads"])
    return None


_ARCHS = MappingProxyType({
    "llama": ArchSpec("llama", _llama_tensor_name, _llama_config, _llama_row_permutation),
})


class GGUFTensor:
    """One tensor of a GGUF file, in HF name and orientation; decoded only on request."""

    def __init__(self, path: Path, name: str, raw: Any, row_perm: np.ndarray | None) -> None:
        self.name = name  # HF name
        self.gguf_name: str = raw.name
        self._path = path
        self._raw = raw  # gguf ReaderTensor: a view into the memory map
        self._type: GGMLQuantizationType = raw.tensor_type
        self._row_perm = row_perm
        self.shape: tuple[int, ...] = tuple(int(d) for d in reversed(raw.shape.tolist()))  # HF [out, in]
        self.ggml_type: str = self._type.name
        self.nbytes: int = int(raw.n_bytes)

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, gguf={self.gguf_name!r}, shape={list(self.shape)}, type={self.ggml_type})"

    def _rows(self, a: np.ndarray) -> torch.Tensor:
        # rows in HF order; np.take along 0 copies, from_numpy does not
        return torch.from_numpy(a if self._row_perm is None else np.take(a, self._row_perm, axis=0))

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of `shape`, values as in the HF checkpoint (q/k rows un-permuted)."""
        try:
            out = gguf_quants.dequantize(self._raw.data, self._type, self.shape)
        except NotImplementedError:
            raise CheckpointError(
                f"{self._path}: tensor {self.gguf_name!r} uses ggml type {self.ggml_type}, which we cannot decode"
            ) from None
        return self._rows(out)

    def int4_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(q uint8 [out, in] 0..15, scale f32 [out, in//32], minv f32 [out, in//32]) for Q4_0/Q4_1, else None.

        dequantize() == q * scale + minv, each scale/minv repeated over its group of 32 along `in`.
        """
        if not gguf_quants.is_int4(self._type):
            return None
        q, scale, minv = gguf_quants.int4_groups(self._raw.data, self._type, self.shape)
        return self._rows(q), self._rows(scale), self._rows(minv)


class GGUFCheckpoint:
    """A memory-mapped GGUF file with an HF-equivalent `config` and HF-named `tensors`."""

    def __init__(self, path: Path, reader: GGUFReader, spec: ArchSpec) -> None:
        self.path = path
        self.architecture = spec.name
        self.reader = reader  # the gguf package's reader (raw tensors in GGUF order and names)
        named: dict[str, Any] = {}
        for raw in reader.tensors:
            hf_name = spec.hf_tensor_name(raw.name)
            if hf_name is None:
                raise CheckpointError(f"{path}: tensor {raw.name!r} is not part of a {spec.name} model")
            named[hf_name] = raw
        shapes = {n: tuple(int(d) for d in reversed(r.shape.tolist())) for n, r in named.items()}
        try:
            self.config: dict = spec.build_config(self.metadata, shapes)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        self.tensors: dict[str, GGUFTensor] = {
            n: GGUFTensor(path, n, r, spec.row_permutation(n, shapes[n], self.config)) for n, r in named.items()
        }

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self.tensors)})"

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (str, number, bool or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def metadata_keys(self) -> list[str]:
        return [k for k in self.reader.fields if not k.startswith("GGUF.")]

    def tensor(self, name: str) -> GGUFTensor:
        """The tensor with this HF name; CheckpointError naming file and tensor when absent."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: checkpoint lacks tensor {name!r}")
        return self.tensors[name]


def _read(path: Path) -> GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4 or int.from_bytes(magic, "little") != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        return _CheckedReader(path)
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        # a header cut short or garbled makes the reader trip over its own offsets
        raise CheckpointError(f"{path}: unreadable GGUF header (truncated or corrupt file?): {e}") from None


def open_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Map a GGUF file; raises CheckpointError (bad file) or UnsupportedArchitecture."""
    path = Path(path)
    reader = _read(path)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    spec = _ARCHS.get(arch)
    if spec is None:
        raise UnsupportedArchitecture(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(_ARCHS))}"
        )
    return GGUFCheckpoint(path, reader, spec)
