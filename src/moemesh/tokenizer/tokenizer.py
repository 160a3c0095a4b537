"""The model's tokenizer: built from GGUF metadata or loaded from an HF checkpoint directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from moemesh.errors import CheckpointError, UnsupportedArchitecture
from moemesh.tokenizer.chat import ChatTemplate

# Tokens that end a turn in common chat formats; any present in the vocab stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                      "<|end_of_text|>", "<end_of_turn>", "<|return|>")

# llama.cpp token_type values (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizer:
    """How text is split before byte-level BPE, per GGUF `tokenizer.ggml.pre` (llama.cpp's names)."""

    build: Callable[[], Any]
    nfc: bool = False  # HF's Qwen2 tokenizer NFC-normalizes first
    ignore_merges: bool = False  # HF's llama3 tokenizer takes whole-word vocab hits as is


def _gpt2() -> Any:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> Any:
    # llama.cpp's smollm/starcoder regexes: "\p{N}" (each digit alone) first, then GPT-2's
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str) -> Callable[[], Any]:
    return lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


_PRE_TOKENIZERS = MappingProxyType({
    "default": _PreTokenizer(_gpt2),
    "gpt-2": _PreTokenizer(_gpt2),
    "smollm": _PreTokenizer(_digits_then_gpt2),
    "starcoder": _PreTokenizer(_digits_then_gpt2),
    "refact": _PreTokenizer(_digits_then_gpt2),
    "codeshell": _PreTokenizer(_digits_then_gpt2),
    "llama-bpe": _PreTokenizer(_split_then_bytes(_LLAMA3_SPLIT), ignore_merges=True),
    "llama3": _PreTokenizer(_split_then_bytes(_LLAMA3_SPLIT), ignore_merges=True),
    "qwen2": _PreTokenizer(_split_then_bytes(_QWEN2_SPLIT), nfc=True),
    "deepseek-r1-qwen": _PreTokenizer(_split_then_bytes(_QWEN2_SPLIT), nfc=True),
})


class _HasMetadata(Protocol):
    def metadata(self, key: str, default: Any = None) -> Any: ...


def _gguf_backend(meta: _HasMetadata, where: str) -> tuple[Backend, bool]:
    """A byte-level BPE tokenizers.Tokenizer from GGUF metadata, and whether it adds BOS."""
    model = meta.metadata("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedArchitecture(f"{where}: GGUF tokenizer model {model!r} is not supported; supported: gpt2")
    pre_name = meta.metadata("tokenizer.ggml.pre", "default")
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        supported = ", ".join(sorted(_PRE_TOKENIZERS))
        raise UnsupportedArchitecture(
            f"{where}: GGUF pre-tokenizer {pre_name!r} is not supported; supported: {supported}"
        )
    tokens: list[str] = meta.metadata("tokenizer.ggml.tokens")
    merges: list[str] | None = meta.metadata("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise CheckpointError(f"{where}: GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=pre.ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception on an inconsistent vocabulary
        raise CheckpointError(f"{where}: invalid GGUF tokenizer: {e}") from None
    backend = Backend(bpe)
    if pre.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre.build()
    backend.decoder = decoders.ByteLevel()

    # llama.cpp matches CONTROL and USER_DEFINED tokens whole in raw text; only CONTROL ones are special
    types: list[int] = meta.metadata("tokenizer.ggml.token_type") or [1] * len(tokens)
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    backend.add_special_tokens(specials)
    backend.add_tokens(user)

    add_bos = bool(meta.metadata("tokenizer.ggml.add_bos_token", False))
    bos_id = meta.metadata("tokenizer.ggml.bos_token_id")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return backend, add_bos


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a token either as text or as a serialized AddedToken
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON: {e}") from None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    """Text <-> token ids, end-of-turn ids and the chat template of one model."""

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_ids: list[int],
                 chat_template: str | None) -> None:
        self.backend = backend
        self._bos_token_id = bos_token_id
        eos = set(eos_token_ids)
        for token in END_OF_TURN_TOKENS:
            if (tid := backend.token_to_id(token)) is not None:
                eos.add(tid)
        self._eos_token_ids = frozenset(eos)
        first_eos = eos_token_ids[0] if eos_token_ids else None
        self._chat = ChatTemplate(chat_template, bos_token=self._token_text(bos_token_id),
                                  eos_token=self._token_text(first_eos))

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    @classmethod
    def from_gguf(cls, ckpt_or_path: _HasMetadata | str | os.PathLike[str]) -> Tokenizer:
        """Build from a GGUF checkpoint's tokenizer.ggml.* metadata (anything with ``metadata(key,
        default)``, e.g. a weights.gguf_reader.GGUFFile, or a path)."""
        if isinstance(ckpt_or_path, (str, os.PathLike)):
            from moemesh.weights.gguf_reader import open_gguf_file  # lazy: weights pull in torch

            ckpt_or_path = open_gguf_file(ckpt_or_path)
        meta = ckpt_or_path
        where = str(getattr(meta, "path", "GGUF"))
        backend, _ = _gguf_backend(meta, where)
        eos_ids = _id_list(meta.metadata("tokenizer.ggml.eos_token_id"))
        eos_ids += _id_list(meta.metadata("tokenizer.ggml.eot_token_id"))
        eos_ids += _id_list(meta.metadata("tokenizer.ggml.eom_token_id"))
        return cls(backend, bos_token_id=meta.metadata("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids,
                   chat_template=meta.metadata("tokenizer.chat_template"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, generation_config.json) from an HF checkpoint dir."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{tok_file}: missing (moemesh needs a fast tokenizer.json)")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{tok_file}: cannot load tokenizer: {e}") from None
        tok_config = _read_json(root / "tokenizer_config.json")
        gen_config = _read_json(root / "generation_config.json")
        model_config = _read_json(root / "config.json")

        def token_id(key: str) -> int | None:
            text = _token_content(tok_config.get(key))
            return None if text is None else backend.token_to_id(text)

        eos_ids = [i for i in [token_id("eos_token")] if i is not None]
        eos_ids += _id_list(gen_config.get("eos_token_id")) + _id_list(model_config.get("eos_token_id"))
        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_ids = _id_list(gen_config.get("bos_token_id")) or _id_list(model_config.get("bos_token_id"))
            bos_id = bos_ids[0] if bos_ids else None
        return cls(backend, bos_token_id=bos_id, eos_token_ids=eos_ids,
                   chat_template=_dir_chat_template(root, tok_config))

    def save_dir(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json + tokenizer_config.json so ``from_dir(path)`` loads this tokenizer
        (how a store converted from a GGUF, whose tokenizer lives in metadata, keeps it)."""
        root = Path(path)
        self.backend.save(str(root / "tokenizer.json"))
        eos = sorted(self._eos_token_ids)
        config = {"bos_token": self._token_text(self._bos_token_id) or None,
                  "eos_token": self._token_text(eos[0]) if eos else None,
                  "chat_template": self.chat_template}
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        (root / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": self._bos_token_id}))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; add_special_tokens adds BOS (etc.) only where the model's tokenizer says so."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        return self._chat.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat.source


def _dir_chat_template(root: Path, tok_config: dict) -> str | None:
    """tokenizer_config's chat_template (text or named list), else a chat_template.jinja file."""
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: use the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    jinja_file = root / "chat_template.jinja"
    return jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
