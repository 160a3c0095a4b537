"""The shared decoder-only transformer every architecture file builds."""
from __future__ import annotations

import torch

from ..batch import BatchLayout
from ..kvcache.base import KVCache
from ..layers.attention import Attention
from ..layers.gated_deltanet import GatedDeltaNet
from ..layers.head import OutputHead
from ..layers.mlp import GatedMLP
from ..layers.moe import MoEBlock
from ..layers.norm import RMSNorm
from ..layers.rope import make_rotary
from .args import ModelArgs


class DecoderLayer(torch.nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention | GatedDeltaNet | torch.nn.Module, ffn_norm: RMSNorm,
                 ffn: GatedMLP | MoEBlock) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, x, cos, sin, cache: KVCache, batch: BatchLayout) -> torch.Tensor:
        # x: [T, D] residual stream (fp32)
        return self.ffn_block(self.attention_block(x, cos, sin, cache, batch))

    def attention_block(self, x, cos, sin, cache: KVCache, batch: BatchLayout) -> torch.Tensor:
        """x + attention(norm(x)): [T, D] -> [T, D] (layer-major prefill runs it chunk by chunk)."""
        return x + self.attn(self.attn_norm(x), cos, sin, cache, batch)

    def ffn_block(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """x + ffn(norm(x)): [T, D] -> [T, D]. Layer-major prefill runs it over a whole prompt with
        ``rows`` = its chunk: every call but the routed experts' loads is made per block of ``rows``
        tokens, as chunked prefill makes it (fp32 GEMMs' row results depend on the row count)."""
        if rows is None or x.shape[0] <= rows:
            return x + self.ffn(self.ffn_norm(x))
        blocks = range(0, x.shape[0], rows)
        h = torch.cat([self.ffn_norm(x[a : a + rows]) for a in blocks])  # [T, D]
        if isinstance(self.ffn, MoEBlock):
            return x + self.ffn(h, rows=rows)
        return x + torch.cat([self.ffn(h[a : a + rows]) for a in blocks])


class Transformer(torch.nn.Module):
    """forward(tokens, positions, cache, batch) over a flat token axis holding several sequences."""

    def __init__(
        self,
        args: ModelArgs,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        norm: RMSNorm,
        lm_head: OutputHead,
    ) -> None:
        super().__init__()
        self.args = args
        self.embed = embed  # [V, D] in its stored dtype; rows are cast to fp32 on lookup
        self.layers = torch.nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head  # [V, D]
        self.rope = make_rotary(args.rope_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings,
                                args.mrope_section)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        batch: BatchLayout,
        all_logits: bool = False,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, positions: [T] -> logits [T, V] if all_logits else [B, V] (last token of each
        sequence). Appends the tokens to each sequence's KV cache. positions may be [3, T] (M-RoPE);
        embeds [T, D] replaces the token embeddings (image features at their placeholders)."""
        cache.begin(batch)
        x = self.hidden_states(tokens, positions, cache, batch, embeds)  # [T, D]
        cache.end(batch)
        if not all_logits and x.shape[0] != len(batch.seq_ids):  # (decode steps: every token is a last one)
            x = x[batch.last_token_indices()]  # [B, D]
        return self.logits(x)

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                      batch: BatchLayout, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding and every layer: tokens, positions [T] -> the last layer's residual stream [T, D].
        Between cache.begin and cache.end; the compiled decode step (engine/compiled.py) traces this
        code itself over a one-token view of the cache."""
        x = self.embed[tokens].float() if embeds is None else embeds  # [T, D]
        cos, sin = self.rope.cos_sin(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, batch)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: x [B, D] -> [B, V]."""
        return self.lm_head(self.norm(x))

    def new_cache(self, kv: str = "dense") -> KVCache:
        """kv: "dense" or "turboquant:BITS[:WINDOW]" (see kvcache/spec.py); hybrid models get a
        HybridCache (that KV cache for the attention layers, recurrent states for the others)."""
        return model_cache(self.args, kv, list(self.layers))


def model_cache(args: ModelArgs, kv: str, layers: list[DecoderLayer]) -> KVCache:
    """The cache for ``layers`` (a whole model or a pipeline stage's slice, their cache indices
    numbered 0..n-1 per kind): a KV cache, wrapped in a HybridCache when some layers are linear."""
    from ..kvcache.recurrent import HybridCache, RecurrentStateCache
    from ..kvcache.spec import make_cache

    linear = sum(isinstance(layer.attn, GatedDeltaNet) for layer in layers)
    cache = make_cache(kv, len(layers) - linear, **args.cache_layout())
    indexers = sum(getattr(layer.attn, "indexer", None) is not None for layer in layers)
    if indexers:  # DeepSeek sparse attention (glm_moe_dsa): + the indexers' keys
        from ..kvcache.indexed import IndexedCache, IndexKeys

        return IndexedCache(cache, IndexKeys(indexers, args.index_head_dim))
    if not linear:
        return cache
    assert args.linear_attn is not None
    return HybridCache(cache, RecurrentStateCache(linear, args.linear_attn.state_shape()))
