"""How much a KV cache changes a model's predictions: teacher-forced NLL and greedy continuations.

Used by the TurboQuant tests and bench/kv_quality.py. The text is fed in chunks so that, as in
real use, most attention reads history that is already in the cache (quantized, for a compressed
cache) rather than the chunk's own full-precision keys.
"""
from __future__ import annotations

import math

import torch

from ..batch import BatchLayout
from ..models.transformer import Transformer


@torch.inference_mode()
def teacher_forced(model: Transformer, ids: list[int], kv: str = "dense", chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For every i: (-log p(ids[i+1] | ids[:i+1]) float64, the model's top-1 token int64), both
    [len(ids) - 1]."""
    cache = model.new_cache(kv)
    cache.add_sequence(0)
    tokens = torch.tensor(ids)
    nll, top1 = [], []
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)  # the last token is only ever a target
        batch = BatchLayout([0], [end - start])
        logits = model(tokens[start:end], torch.arange(start, end), cache, batch, all_logits=True)  # [n, V]
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll.append(-logp.gather(1, tokens[start + 1 : end + 1, None]).squeeze(1))
        top1.append(logits.argmax(dim=-1))
    return torch.cat(nll), torch.cat(top1)


def token_nll(model: Transformer, ids: list[int], kv: str = "dense", chunk: int = 256) -> torch.Tensor:
    """-log p(ids[i+1] | ids[:i+1]) for every i: float64 [len(ids) - 1]."""
    return teacher_forced(model, ids, kv, chunk)[0]


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


@torch.inference_mode()
def greedy(model: Transformer, ids: list[int], n: int, kv: str = "dense", chunk: int = 256) -> list[int]:
    """n greedy tokens after the prompt ids (prefilled in chunks), one decode step each."""
    cache = model.new_cache(kv)
    cache.add_sequence(0)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        logits = model(torch.tensor(part), torch.arange(start, start + len(part)), cache, BatchLayout([0], [len(part)]))
    out: list[int] = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        pos = len(ids) + len(out) - 1
        logits = model(torch.tensor(out[-1:]), torch.tensor([pos]), cache, BatchLayout([0], [1]))
    return out


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(length of the common prefix, positions that agree)."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return prefix, sum(x == y for x, y in zip(a, b))
