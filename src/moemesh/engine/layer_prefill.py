"""Layer-major prefill: one long prompt through the model a layer at a time, so each routed expert
is read once per prompt instead of once per chunk.

Chunked prefill feeds a prompt in chunks of ``max_prefill_tokens`` through every layer; under a RAM
budget each chunk of a 128-expert model touches nearly every expert of every layer, so a 20k-token
prompt reads the model ~40 times. Here, for each layer in turn: the attention runs over the prompt
in the same chunks (each chunk attends to the chunks before it, written at explicit positions:
``BatchLayout.starts``), then the MoE FFN runs once over all the prompt's tokens, loading every
routed expert once (in waves when the cache has fewer slots than the layer needs) and applying it
to all its tokens. The hidden state of the whole prompt is held between layers ([N, D] fp32: 94 MB
for 8k tokens of a 2880-wide model).

Exact: attention sees the same keys in the same chunks as chunked prefill, and the FFN makes the
same kernel calls (norms, routers, shared experts and each expert's rows per chunk-sized block of
tokens; only the loads are shared), experts added in id order, so the logits equal chunked
prefill's bit for bit whatever a kernel's batch behaviour (tests/test_layer_prefill.py). The engine advances a job one layer per step and
runs the other sequences' decode steps in between, so they keep streaming while a long prompt fills.
"""
from __future__ import annotations

import torch

from ..batch import BatchLayout
from ..kvcache.base import KVCache
from ..models.transformer import Transformer


def eligible(model: Transformer, cache: KVCache) -> bool:
    """Layer-major prefill pays off when experts are streamed from disk, and needs a cache that writes
    at explicit positions (dense and MLA-latent caches; TurboQuant's coding window is per sequence)."""
    return cache.supports_starts and any(getattr(getattr(layer.ffn, "provider", None), "streams_experts", False)
                                         for layer in model.layers)


class LayerMajorPrefill:
    """The rest of one sequence's prompt, prefilled a layer per ``step()``; ``finish()`` -> last logits."""

    def __init__(self, model: Transformer, cache: KVCache, seq_id: int, tokens: list[int], start: int,
                 chunk: int) -> None:
        self.model, self.cache, self.seq_id, self.chunk = model, cache, seq_id, chunk
        self.start, self.n = start, len(tokens)
        self.layer = 0
        with torch.inference_mode():
            self.x = model.embed[torch.tensor(tokens, dtype=torch.long)].float()  # [N, D]
        self.positions = torch.arange(start, start + self.n)  # [N]
        cache.begin(BatchLayout([seq_id], [self.n], starts=[start]))  # room for the whole prompt, once

    @property
    def done(self) -> bool:
        return self.layer == len(self.model.layers)

    @torch.inference_mode()
    def step(self) -> None:
        """Advance one layer: attention chunk by chunk, then the FFN over every token at once."""
        layer = self.model.layers[self.layer]
        for a in range(0, self.n, self.chunk):
            b = min(self.n, a + self.chunk)
            cos, sin = self.model.rope.cos_sin(self.positions[a:b])
            batch = BatchLayout([self.seq_id], [b - a], starts=[self.start + a])
            self.x[a:b] = layer.attention_block(self.x[a:b], cos, sin, self.cache, batch)
        self.x = layer.ffn_block(self.x, rows=self.chunk)  # [N, D]: each routed expert loaded once for all its tokens
        self.layer += 1

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """After the last layer: advance the cache past the prompt; logits of its last token [1, V]."""
        self.cache.end(BatchLayout([self.seq_id], [self.n]))
        return self.model.lm_head(self.model.norm(self.x[-1:]))
