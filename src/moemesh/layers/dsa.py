"""DeepSeek sparse attention (DSA) as GLM-5 (``glm_moe_dsa``) uses it: multi-head latent attention
(layers/mla.py) restricted, for each query, to the ``index_topk`` past tokens a small indexer scores
highest.

Shape legend: T tokens of the pass, n a sequence's tokens in it, L its keys so far, Hi indexer
heads, Di indexer head dim, R rotary dims, Q q_lora_rank.

Indexer (per "full" layer): q = wq_b(q_resid) [n, Hi, Di] from the attention's normed q LoRA
activation, k = LayerNorm(wk(x)) [n, Di] (cached per token), interleaved RoPE on the first R dims
of both; score[t, j] = sum_h w[t, h] relu(q[t, h] . k[j] / sqrt(Di)) with w = weights_proj(x) /
sqrt(Hi); each query keeps its top ``index_topk`` causal keys. A "shared" layer reuses the
selection of the layer before it. With at most ``index_topk`` keys every causal key is kept and
the attention is plain MLA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batch import BatchLayout
from ..kvcache.base import KVCache
from ..kvcache.indexed import IndexedCache
from ..quant.qlinear import QuantLinear
from .mla import MultiHeadLatentAttention, apply_rope_pairs


class Indexer(torch.nn.Module):
    def __init__(self, layer: int, wq_b: QuantLinear, wk: QuantLinear, k_norm_weight: torch.Tensor,
                 k_norm_bias: torch.Tensor, weights_proj: QuantLinear, heads: int, head_dim: int, rope_dim: int,
                 topk: int) -> None:
        super().__init__()
        self.layer, self.wq_b, self.wk, self.weights_proj = layer, wq_b, wk, weights_proj
        self.k_norm_weight = torch.nn.Parameter(k_norm_weight.float(), requires_grad=False)  # [Di]
        self.k_norm_bias = torch.nn.Parameter(k_norm_bias.float(), requires_grad=False)  # [Di]
        self.heads, self.head_dim, self.rope_dim, self.topk = heads, head_dim, rope_dim, topk

    def select(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: IndexedCache, batch: BatchLayout) -> list[torch.Tensor]:
        """x [T, D], q_resid [T, Q] -> per sequence bool [n, L]: the keys each query may attend."""
        t, r = x.shape[0], self.rope_dim
        q = self.wq_b(q_resid).view(t, self.heads, self.head_dim)  # [T, Hi, Di]
        k = F.layer_norm(self.wk(x), (self.head_dim,), self.k_norm_weight, self.k_norm_bias, 1e-6)  # [T, Di]
        q = torch.cat([apply_rope_pairs(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([apply_rope_pairs(k[:, None, :r], cos, sin)[:, 0], k[:, r:]], dim=-1)
        w = self.weights_proj(x).float() * self.heads**-0.5  # [T, Hi]
        out = []
        for sid, off, n in zip(batch.seq_ids, batch.offsets, batch.query_lens):
            start = cache.length(sid)
            keys = cache.keys.write(self.layer, sid, start, k[off : off + n])  # [L, Di]
            scores = F.relu(q[off : off + n] @ keys.t() * self.head_dim**-0.5)  # [n, Hi, L]
            index = (w[off : off + n, None, :] @ scores)[:, 0]  # [n, L]
            causal = torch.arange(keys.shape[0])[None, :] <= torch.arange(start, start + n)[:, None]  # [n, L]
            index = index.masked_fill(~causal, float("-inf"))
            picked = index.topk(min(self.topk, keys.shape[0]), dim=-1).indices  # [n, k]
            out.append(torch.zeros_like(causal).scatter_(1, picked, True) & causal)
        return out


class SparseMLA(MultiHeadLatentAttention):
    """MLA whose queries see only their indexer's top-k keys (``indexer`` None: reuse the previous layer's)."""

    def __init__(self, *args, indexer: Indexer | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.indexer = indexer

    def prepare_graph(self) -> str:
        """Before a compiled decode step: this layer has no graph form, so the model decodes eagerly."""
        return "sparse attention (the top-k keys of the indexer) is not in the compiled step"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                batch: BatchLayout) -> torch.Tensor:
        # x: [T, D]; cos/sin: [T, 1, R]
        if getattr(cache, "keys", None) is None:  # an IndexedCache, or a pipeline stage's view of one
            raise TypeError(f"sparse attention needs the model's IndexedCache (new_cache()), got {type(cache).__name__}")
        c, t, h = self.cfg, x.shape[0], self.num_heads
        assert self.q_b is not None and self.q_a_norm is not None
        q_resid = self.q_a_norm(self.q_in(x))  # [T, Q]
        if self.indexer is not None:
            allowed = self.indexer.select(x, q_resid, cos, sin, cache, batch)
            cache.selection = dict(zip(batch.seq_ids, allowed))
        else:
            if any(sid not in cache.selection for sid in batch.seq_ids):
                raise RuntimeError(f"layer {self.layer} reuses the previous layer's top-k, which did not run in this pass "
                                   "(a pipeline stage cannot start on a 'shared' sparse-attention layer)")
            allowed = [cache.selection[sid] for sid in batch.seq_ids]
        q_nope, q_pe = self.q_b(q_resid).view(t, h, c.qk_head_dim).split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)  # [T, L], [T, R]
        latent = self.kv_a_norm(latent)
        q_pe, k_pe = apply_rope_pairs(q_pe, cos, sin), apply_rope_pairs(k_pe.unsqueeze(1), cos, sin)
        q_lat = torch.einsum("thn,hnl->thl", q_nope, self.w_uk)  # [T, H, L]: absorbed keys
        query = torch.cat([q_lat, q_pe], dim=-1)  # [T, H, L + R]
        key = torch.cat([latent.unsqueeze(1), k_pe], dim=-1)  # [T, 1, L + R]
        out_lat = cache.attend(self.layer, query, key, None, batch, self.scale, allowed=allowed)  # [T, H, L]
        out = torch.einsum("thl,hvl->thv", out_lat, self.w_uv)  # [T, H, V]
        return self.o_proj(out.reshape(t, h * c.v_head_dim))
