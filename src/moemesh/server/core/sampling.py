"""Request fields -> validated SamplingParams, and the context-window check (never truncate)."""
from __future__ import annotations

from ...engine.sampling_params import SamplingParams
from ...loading.sampling_defaults import SamplingDefaults
from ..common.errors import APIError

GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (vLLM's rule): dividing by it overflows
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


def check_prompt_fits(prompt_len: int, context_length: int, param: str) -> None:
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param=param)
    if prompt_len >= context_length:
        raise APIError(
            400, f"the prompt has {prompt_len} tokens but the context window is {context_length} tokens "
            "(prompts are never truncated; shorten it)", param=param, code="context_length_exceeded",
        )


def make_params(*, prompt_len: int, context_length: int, max_tokens: int | None, max_tokens_field: str,
                temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                min_p: float | None = None, seed: int | None = None, presence_penalty: float | None = None,
                frequency_penalty: float | None = None, repetition_penalty: float | None = None,
                stop: list[str] | None = None, logprobs: int | None = None,
                logprobs_field: str = "logprobs", defaults: SamplingDefaults | None = None) -> SamplingParams:
    """None means the model's recommended value (``defaults``: its generation_config.json or GGUF
    sampling keys), else the API's default; max_tokens defaults to (and is capped at) what the
    context leaves.

    Capping is safe to do silently: a generation that reaches the context ends with finish_reason length.
    """
    if defaults is not None:
        temperature = defaults.temperature if temperature is None else temperature
        top_p = defaults.top_p if top_p is None else top_p
        top_k = defaults.top_k if top_k is None else top_k
        min_p = defaults.min_p if min_p is None else min_p
        repetition_penalty = defaults.repetition_penalty if repetition_penalty is None else repetition_penalty
    params = SamplingParams(
        temperature=1.0 if temperature is None else (0.0 if 0 <= temperature < GREEDY_BELOW else temperature),
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None or top_k == -1 else top_k,  # -1 = off, as vLLM spells it
        min_p=min_p or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        seed=seed,
        max_tokens=max_tokens if max_tokens is not None else 1,
        stop=list(stop or []),
        logprobs=logprobs,
    )
    try:
        params.validate()
    except ValueError as exc:
        field = str(exc).split()[0]
        field = {"max_tokens": max_tokens_field, "logprobs": logprobs_field}.get(field, field)
        raise APIError(400, str(exc).replace(str(exc).split()[0], field, 1), param=field) from None
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise APIError(400, f"seed must fit in 64 bits, got {seed}", param="seed")
    room = context_length - prompt_len
    params.max_tokens = room if max_tokens is None else min(max_tokens, room)
    return params
