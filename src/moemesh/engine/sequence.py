"""Sequence: one request's tokens, sampling state and progress through the engine."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stop_token_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_computed: int = 0  # tokens already in the KV cache
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of computed
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    media: Any = None  # models.media.Media: the prompt's images (embeddings at their placeholders, M-RoPE positions)
    grammar: Any = None  # tokenizer.grammar.Matcher: what the output may be (structured output); None: anything
    grammar_seconds: float = 0.0  # time spent computing its masks and advancing it

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def next_chunk(self, budget: int) -> list[int]:
        """Tokens to feed this step: the next prompt chunk, or the last sampled token."""
        ids = self.all_ids
        return ids[self.num_computed : self.num_computed + max(1, budget)]
