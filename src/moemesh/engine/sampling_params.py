"""Per-request sampling settings (OpenAI-style knobs plus HF repetition penalty)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs; bounds the per-step top-k cost.


@dataclass
class SamplingParams:
    """How one request turns logits into tokens.

    temperature 0 means greedy; top_k 0 and top_p 1 and min_p 0 mean "off".
    repetition_penalty follows HF (over prompt + generated tokens: divide positive
    logits, multiply negative ones); presence/frequency penalties follow OpenAI
    (over generated tokens only: logit -= presence * (count > 0) + frequency * count).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field.

        Comparisons are written as `not (lo <= x <= hi)` so NaN is rejected too.
        """
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not (-2 <= self.presence_penalty <= 2):
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not (-2 <= self.frequency_penalty <= 2):
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not (0 <= self.logprobs <= MAX_LOGPROBS)
        ):
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")
