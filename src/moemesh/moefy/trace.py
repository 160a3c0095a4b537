"""Routing traces: which experts every token picked at every MoE layer while generating, and
which experts the next-layer predictor (experts/lazy.py Lookahead) guessed for the next layer.

A trace is plain JSON: {"meta": {...}, "sequences": [{"prompt", "steps": [step]}]} where a step is
one forward of one sequence: {"phase": "prefill" | "decode", "pos": first position,
"ids": [layer][token][k], "pred": [layer][token][k] (experts of layer l+1 predicted at layer l;
[] for the last MoE layer)}.
"""
from __future__ import annotations

from typing import Any

import torch

from ..engine.engine import Engine
from ..engine.sampling_params import SamplingParams
from ..layers.moe import ExpertProvider, MoEBlock
from ..loading.experts import lookaheads
from ..loading.loader import LoadedModel


class TracingProvider(ExpertProvider):
    """Wraps a provider; records the ids (and the next layer's predicted ids) of every call."""

    def __init__(self, inner: ExpertProvider, predictors: dict, first_layer: int) -> None:
        self.inner, self.predictors, self.first_layer = inner, predictors, first_layer
        self.steps: list[dict[str, Any]] = []

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            rows: int | None = None) -> torch.Tensor:
        # x: [T, D], ids: [T, A]
        if layer == self.first_layer:
            self.steps.append({"ids": [], "pred": []})
        step = self.steps[-1]
        step["ids"].append(ids.tolist())
        look = self.predictors.get(layer)
        if look is None:
            step["pred"].append([])
        else:
            pred, _ = look.router(x * look.ratio)  # [T, A], per token
            step["pred"].append(pred.tolist())
        return self.inner.run(layer, x, ids, weights, rows)

    def stats(self) -> dict:
        return self.inner.stats()


def record(loaded: LoadedModel, prompts: list[str], max_tokens: int, seed: int = 0,
           temperature: float = 0.7) -> list[dict[str, Any]]:
    """Generate each prompt alone (chat template, sampled with a fixed seed) and trace it."""
    model, tok = loaded.model, loaded.tokenizer
    blocks = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoEBlock)]
    if not blocks or tok is None:
        raise ValueError("routing traces need an MoE model with a tokenizer")
    inner = blocks[0].provider
    tracer = TracingProvider(inner, lookaheads(model), blocks[0].layer)
    for b in blocks:
        b.provider = tracer
    out = []
    try:
        for i, prompt in enumerate(prompts):
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False)
            tracer.steps = []
            engine = Engine(model, stop_token_ids=tok.eos_token_ids)
            params = SamplingParams(temperature=temperature, top_p=0.9, seed=seed + i, max_tokens=max_tokens)
            (seq,) = engine.generate([ids], params)
            pos = 0
            for step in tracer.steps:
                n = len(step["ids"][0])
                step.update(phase="prefill" if pos < len(ids) else "decode", pos=pos)
                pos += n
            out.append({"prompt": prompt, "prompt_tokens": len(ids), "output": tok.decode(seq.output_ids),
                        "steps": tracer.steps})
    finally:
        for b in blocks:
            b.provider = inner
    return out


def token_rows(sequence: dict[str, Any]) -> list[list[list[int]]]:
    """One sequence's trace as per-token rows: [token][layer] -> experts (prefill tokens included)."""
    rows = []
    for step in sequence["steps"]:
        for t in range(len(step["ids"][0])):
            rows.append([layer[t] for layer in step["ids"]])
    return rows


def routing_stats(sequences: list[dict[str, Any]], num_experts: int) -> dict[str, Any]:
    """Per layer: reuse between consecutive tokens (share of a token's experts the previous token
    also picked), popularity skew (share of picks going to the most popular quarter of experts,
    normalized entropy), and the next-layer predictor's accuracy."""
    rows = [token_rows(s) for s in sequences]
    layers = len(rows[0][0])
    k = len(rows[0][0][0])
    reuse = [0.0] * layers
    pairs = 0
    counts = torch.zeros(layers, num_experts)
    for seq in rows:
        for prev, cur in zip(seq, seq[1:]):
            pairs += 1
            for li in range(layers):
                reuse[li] += len(set(prev[li]) & set(cur[li])) / k
        for tok in seq:
            for li in range(layers):
                counts[li, tok[li]] += 1
    hit = [0] * layers
    total = [0] * layers
    for s in sequences:
        for step in s["steps"]:
            for li in range(layers - 1):
                for pred, actual in zip(step["pred"][li], step["ids"][li + 1]):
                    hit[li + 1] += len(set(pred) & set(actual))
                    total[li + 1] += len(actual)
    share = counts / counts.sum(1, keepdim=True)  # [L, E]
    top_quarter = share.sort(1, descending=True).values[:, : max(1, num_experts // 4)].sum(1)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(1) / torch.log(torch.tensor(float(num_experts)))
    return {
        "tokens": sum(len(r) for r in rows),
        "reuse_consecutive": [r / max(1, pairs) for r in reuse],
        "uniform_reuse": k / num_experts,
        "top_quarter_share": top_quarter.tolist(),
        "normalized_entropy": entropy.tolist(),
        "max_expert_share": share.max(1).values.tolist(),
        "predictor_accuracy": [h / t if t else None for h, t in zip(hit, total)],
    }
