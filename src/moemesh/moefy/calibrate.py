"""Calibration tokens and the dense model's FFN inputs on them."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..batch import BatchLayout
from ..models.transformer import Transformer
from .data import calib_chats, calib_prose

if TYPE_CHECKING:
    from ..tokenizer.tokenizer import Tokenizer


def calibration_sequences(tokenizer: "Tokenizer | None", vocab: int, max_tokens: int, seq_len: int = 512,
                          seed: int = 0) -> list[list[int]]:
    """The shipped calibration texts as token sequences (chat answers in the chat template, prose
    paragraphs plain), interleaved, up to ``max_tokens`` in all. A model without a tokenizer (tiny
    test checkpoints) gets seeded random ids instead."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        n = -(-max_tokens // seq_len)
        return [torch.randint(0, vocab, (min(seq_len, max_tokens - i * seq_len),), generator=g).tolist() for i in range(n)]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": c["prompt"]},
                                            {"role": "assistant", "content": c["answer"]}], add_generation_prompt=False)
             for c in calib_chats()]
    prose = [(t, True) for t in calib_prose()]
    chat_items = [(t, False) for t in chats]
    texts = [item for pair in zip(chat_items, prose) for item in pair] + chat_items[len(prose):] + prose[len(chat_items):]
    seqs, total = [], 0
    for text, plain in texts:  # the chat template writes its own special tokens
        ids = tokenizer.encode(text, add_special_tokens=plain)[:seq_len]
        ids = ids[: max_tokens - total]
        if len(ids) < 2:
            break
        seqs.append(ids)
        total += len(ids)
    return seqs


class _Recorder(torch.nn.Module):
    """Stands in for a layer's FFN: keeps its input, returns the FFN's output unchanged."""

    def __init__(self, ffn: torch.nn.Module, sink: list[torch.Tensor]) -> None:
        super().__init__()
        self.ffn, self.sink = ffn, sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sink.append(x.detach().clone())
        return self.ffn(x)


def collect_ffn_inputs(model: Transformer, seqs: list[list[int]],
                       on_seq: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Per layer, the normalized FFN inputs [N, D] over all calibration tokens (N = sum of lengths)."""
    sinks: list[list[torch.Tensor]] = [[] for _ in model.layers]
    originals = [layer.ffn for layer in model.layers]
    try:
        for layer, sink in zip(model.layers, sinks):
            layer.ffn = _Recorder(layer.ffn, sink)
        for ids in seqs:
            cache = model.new_cache()
            cache.add_sequence(0)
            model(torch.tensor(ids), torch.arange(len(ids)), cache, BatchLayout([0], [len(ids)]))
            cache.free_sequence(0)
            if on_seq is not None:
                on_seq(len(ids))
    finally:
        for layer, ffn in zip(model.layers, originals):
            layer.ffn = ffn
    return [torch.cat(s) for s in sinks]
