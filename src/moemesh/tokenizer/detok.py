"""Streaming detokenization: text for each new token, never a half-decoded character.

Each step decodes only a short window: the tokens since the last emitted text plus the few before
them (the "prefix"), so decoders that treat the start of a sequence specially (a SentencePiece
leading space) see the same context as a full decode. The window's new text is held back while it
ends in U+FFFD, i.e. while a multi-byte character is still split across tokens.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens kept as context for the first generated ones


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """add(token_id) -> newly completed text; flush() -> whatever is still held back."""

    def __init__(self, tokenizer: _Decoder, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._ids: list[int] = context  # window: [prefix tokens | tokens not yet emitted]
        self._read = len(context)  # ids[:read] are already emitted (or prompt context)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[:self._read])
        full_text = self._decode(self._ids)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character is still incomplete
        new_text = full_text[len(prefix_text):]
        # what was pending becomes the next step's prefix; older tokens are no longer needed
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return new_text

    def flush(self) -> str:
        """Text still held back (e.g. a trailing invalid byte sequence, as U+FFFD)."""
        prefix_text = self._decode(self._ids[:self._read])
        full_text = self._decode(self._ids)
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return full_text[len(prefix_text):]
