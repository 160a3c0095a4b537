"""Batched token sampler: penalties -> grammar mask -> greedy/temperature -> top_k -> top_p -> min_p -> draw.

Each row draws with its own torch.Generator, so a seeded request yields the same
tokens whatever else shares the batch (all other work is row-independent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moemesh.engine.constraints import apply_bitmasks
from moemesh.engine.sampling_params import SamplingParams
from moemesh.quant import decode_kernels


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with OS entropy when seed is None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1  # 63 bits: always a valid seed
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


@dataclass
class SampleResult:
    """One sampled token per row, with its log-prob under the penalized model distribution."""

    token_ids: list[int]
    logprobs: list[float]
    # Per row: [(token_id, logprob)] best first; [] for rows that asked for none.
    # None when no row in the batch asked for logprobs.
    top_logprobs: list[list[tuple[int, float]]] | None


class Sampler:
    """Stateless but for a scratch buffer; one instance can serve every step of every batch."""

    def __init__(self) -> None:
        # masked greedy rows' copy of the logits, kept: a fresh [B, V] buffer each step is fresh pages
        # to fault in (measured 19 ms for one 49k row on a busy machine, against ~10 us reused)
        self._scratch = torch.empty(0)

    def sample(
        self,
        logits: Tensor,  # [B, V] fp32
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        bitmasks: list[Tensor | None] | None = None,  # per row: [W] int32 allowed-token bitmask (a grammar)
    ) -> SampleResult:
        batch, vocab = logits.shape
        masked = bitmasks is not None and any(m is not None for m in bitmasks)
        if not (len(params) == len(prompt_ids) == len(output_ids) == len(generators) == batch):
            raise ValueError(
                f"sampler got {batch} logit rows but {len(params)} params, {len(prompt_ids)} "
                f"prompts, {len(output_ids)} outputs, {len(generators)} generators"
            )
        lib = decode_kernels.load() if logits.dtype == torch.float32 else None
        if lib is not None and all(_plain_greedy(p) for p in params):
            # argmax and its log-probability in one C pass: the same tokens and logprobs as below
            # without a clone and a log_softmax over the vocabulary (~0.3 ms at 49k tokens here)
            tokens, chosen = decode_kernels.greedy(lib, logits)
            if masked:  # the masked argmax; its logprob under the unmasked distribution, as below
                assert bitmasks is not None
                if self._scratch.numel() < logits.numel():
                    self._scratch = torch.empty(logits.numel())
                allowed = self._scratch[: logits.numel()].view(batch, vocab)  # [B, V]
                np.copyto(allowed.numpy(), logits.contiguous().numpy())  # numpy: no OpenMP pool to wait on
                apply_bitmasks(allowed, bitmasks)
                best, _ = decode_kernels.greedy(lib, allowed)
                # log_softmax(x)[t] = x[t] - logsumexp(x), and logsumexp(x) = x[a] - logprob(a) for the argmax a
                chosen = [float(logits[i, t]) - (float(logits[i, a]) - lp)
                          for i, (t, a, lp) in enumerate(zip(best, tokens, chosen))]
                tokens = best
            return SampleResult(token_ids=tokens, logprobs=chosen, top_logprobs=None)
        logits = logits.float().clone()  # [B, V]; never mutate the caller's tensor
        apply_penalties(logits, params, prompt_ids, output_ids)

        # The reported distribution: after penalties, before the grammar's mask and temperature/truncation
        # (as vLLM reports it; a masked distribution would put -inf, which JSON cannot carry, in top_logprobs).
        logp = torch.log_softmax(logits, dim=-1)  # [B, V]
        if masked:
            assert bitmasks is not None
            apply_bitmasks(logits, bitmasks)

        tokens = torch.argmax(logits, dim=-1)  # [B]; first max wins -> ties to lowest id
        sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, dtype=torch.long)  # [S]
            temps = torch.tensor([params[i].temperature for i in sampled_rows])  # [S]
            scaled = logits[rows] / temps.unsqueeze(1)  # [S, V]
            truncate(scaled, [params[i] for i in sampled_rows])
            probs = torch.softmax(scaled, dim=-1)  # [S, V]
            for j, i in enumerate(sampled_rows):
                # Per-row draw: the row's generator sees only the row's own probs.
                tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]

        chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [B]
        return SampleResult(
            token_ids=tokens.tolist(),
            logprobs=chosen.tolist(),
            top_logprobs=_top_logprobs(logp, params),
        )


def _plain_greedy(p: SamplingParams) -> bool:
    """A row that needs only its argmax and that token's log-probability."""
    return (p.temperature == 0 and p.logprobs is None and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0)


def apply_penalties(
    logits: Tensor,  # [B, V] fp32, modified in place
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
) -> None:
    """Apply HF repetition penalty, then OpenAI presence/frequency penalties, in place."""
    batch, vocab = logits.shape
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        seen = torch.zeros(batch, vocab, dtype=torch.bool)  # [B, V]
        r, t = _flat_index([prompt_ids[i] + output_ids[i] for i in rep_rows], rep_rows)
        seen[r, t] = True
        pen = torch.ones(batch)  # [B]
        pen[rep_rows] = torch.tensor([params[i].repetition_penalty for i in rep_rows])
        pen = pen.unsqueeze(1)  # [B, 1]
        penalized = torch.where(logits > 0, logits / pen, logits * pen)  # [B, V]
        logits.copy_(torch.where(seen, penalized, logits))

    freq_rows = [
        i for i, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    ]
    if freq_rows:
        counts = torch.zeros(batch, vocab)  # [B, V] fp32 token counts in the output
        r, t = _flat_index([output_ids[i] for i in freq_rows], freq_rows)
        counts.index_put_((r, t), torch.ones(r.numel()), accumulate=True)
        presence = torch.zeros(batch, 1)  # [B, 1]
        frequency = torch.zeros(batch, 1)  # [B, 1]
        presence[freq_rows, 0] = torch.tensor([params[i].presence_penalty for i in freq_rows])
        frequency[freq_rows, 0] = torch.tensor([params[i].frequency_penalty for i in freq_rows])
        logits -= presence * (counts > 0).float() + frequency * counts


def truncate(scaled: Tensor, params: list[SamplingParams]) -> None:
    """Set logits outside the top_k / top_p / min_p sets to -inf, in place.

    scaled: [S, V] temperature-scaled logits. Each filter works on the distribution
    left by the previous one (top_k -> top_p -> min_p), done once in sorted order.
    """
    need = [
        j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0
    ]
    if not need:
        return
    rows = torch.tensor(need, dtype=torch.long)  # [N]
    sub = scaled[rows]  # [N, V]
    vocab = sub.shape[1]
    # Stable descending sort keeps equal logits in id order, so ties favour low ids.
    sorted_logits, order = torch.sort(sub, dim=-1, descending=True, stable=True)  # [N, V]
    position = torch.arange(vocab).unsqueeze(0)  # [1, V]

    top_k = torch.tensor([params[j].top_k or vocab for j in need]).unsqueeze(1)  # [N, 1]
    sorted_logits = sorted_logits.masked_fill(position >= top_k, float("-inf"))

    probs = torch.softmax(sorted_logits, dim=-1)  # [N, V]
    top_p = torch.tensor([params[j].top_p for j in need]).unsqueeze(1)  # [N, 1]
    # Keep token i while the mass strictly before it is < top_p: the smallest prefix
    # reaching top_p. Position 0 has zero mass before it, so one token always survives.
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [N, V]
    drop_p = (mass_before >= top_p) & (top_p < 1.0)  # top_p == 1 skips float-rounding drops
    drop_p[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))

    probs = torch.softmax(sorted_logits, dim=-1)  # [N, V]
    min_p = torch.tensor([params[j].min_p for j in need]).unsqueeze(1)  # [N, 1]
    drop_min = probs < min_p * probs[:, :1]  # sorted: column 0 holds the max prob
    drop_min[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop_min, float("-inf"))

    # Back to vocab order so the draw is over the same indexing as unfiltered rows.
    sub.scatter_(1, order, sorted_logits)
    scaled[rows] = sub


def _flat_index(id_lists: list[list[int]], rows: list[int]) -> tuple[Tensor, Tensor]:
    """(row index [T], token index [T]) tensors for scattering ragged id lists."""
    row_idx = [r for r, ids in zip(rows, id_lists) for _ in ids]
    tok_idx = [t for ids in id_lists for t in ids]
    return torch.tensor(row_idx, dtype=torch.long), torch.tensor(tok_idx, dtype=torch.long)


def _top_logprobs(
    logp: Tensor, params: list[SamplingParams]  # logp: [B, V]
) -> list[list[tuple[int, float]]] | None:
    """Top-N (id, logprob) per row, N from each row's params.logprobs."""
    wanted = [p.logprobs or 0 for p in params]
    if all(p.logprobs is None for p in params):
        return None
    k = min(max(wanted), logp.shape[1])
    if k == 0:
        return [[] for _ in params]
    values, ids = torch.topk(logp, k, dim=-1)  # [B, k], sorted best first
    values_l, ids_l = values.tolist(), ids.tolist()
    return [list(zip(ids_l[i][:n], values_l[i][:n])) for i, n in enumerate(wanted)]
