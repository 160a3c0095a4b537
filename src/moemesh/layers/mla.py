"""Multi-head latent attention (DeepSeek V2/V3), with the KV cache holding only the latent.

Shape legend: T tokens, D hidden, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
L kv_lora_rank, V v_head_dim.

Per token, kv_a_proj_with_mqa gives a latent c [L] (then RMSNorm'ed) and one rope key k_pe [R]
shared by all heads; kv_b_proj [H (N + V), L] expands c into per-head k_nope [H, N] and v [H, V].
Since k_nope_h = W_uk[h] c and v_h = W_uv[h] c are linear in c, attention can run on c itself
(weight absorption): score_h = <q_nope_h, W_uk[h] c> + <q_pe_h, k_pe> = <[W_uk[h]^T q_nope_h ;
q_pe_h], [c ; k_pe]>, and out_h = W_uv[h] sum_j p_j c_j. That is multi-query attention with one
KV head of key [c ; k_pe] (L + R) and value c (L): the cache stores L + R numbers per token and
layer (``values_in_keys``), not H (N + R + V).

``absorb=False`` is the reference: decompress K/V per head through kv_b_proj and run ordinary
attention over H KV heads (a cache built by ``naive_cache``); tests check the two agree.

A decode token reads both absorbed matrices whole (2 H N L weights: DeepSeek-V3's are 67 MB per layer
in fp32, a quarter of its attention bytes). With ``absorbed_int8`` (models whose trunk is quantized)
they are held as int8 with one fp32 scale per row (17 MB; relative error ~0.2%, far below the int4
trunk's) and applied by one C call per matrix (quant/decode_kernels.heads_i8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..batch import BatchLayout
from ..kvcache.base import KVCache
from ..quant import decode_kernels
from ..quant.qlinear import QuantLinear
from .norm import RMSNorm
from .rope import apply_rope


@dataclass(frozen=True)
class MLAConfig:
    q_lora_rank: int | None  # None: q comes from one q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    interleaved_rope: bool = True  # DeepSeek rotates pairs (x0, x1), (x2, x3), ...
    mscale_all_dim: float = 0.0  # YaRN: the softmax scale is multiplied by mscale(factor, this)^2
    rope_factor: float = 1.0  # YaRN's factor (1: no scaling)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (transformers' ``yarn_apply_mscale``)."""
        scale = self.qk_head_dim**-0.5
        if self.mscale_all_dim and self.rope_factor > 1:
            m = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    @property
    def latent_dim(self) -> int:
        """Numbers cached per token and layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved RoPE: pair (x[2i], x[2i+1]) rotates by angle i. x: [T, H, R],
    cos/sin: [T, 1, R] as cat(f, f). The output lists the rotated pairs' first elements, then
    their second ones (transformers' V3 layout; V2's complex form interleaves them instead - the
    same permutation of q and k, so every dot product is equal)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class MultiHeadLatentAttention(torch.nn.Module):
    def __init__(
        self,
        layer: int,
        cfg: MLAConfig,
        num_heads: int,
        q_in: QuantLinear,
        q_a_norm: RMSNorm | None,
        q_b: QuantLinear | None,
        kv_a: QuantLinear,
        kv_a_norm: RMSNorm,
        kv_b: torch.Tensor,
        o_proj: QuantLinear,
        absorb: bool = True,
        absorbed_int8: bool = False,
    ) -> None:
        """q_in: q_proj [H (N + R), D] without a q LoRA, else q_a_proj [q_lora, D] (then
        q_a_norm and q_b [H (N + R), q_lora]); kv_a: [L + R, D]; kv_b: [H (N + V), L] float."""
        super().__init__()
        self.layer, self.cfg, self.num_heads = layer, cfg, num_heads
        self.q_in, self.q_a_norm, self.q_b = q_in, q_a_norm, q_b
        self.kv_a, self.kv_a_norm, self.o_proj = kv_a, kv_a_norm, o_proj
        w = kv_b.float().view(num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        uk, uv = w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]  # kv_b's key and value halves per head
        self.w_uk = self.w_uv = None
        if absorbed_int8:  # rows = the outputs of each per-head product: [H, L, N] for q -> latent, [H, V, L] back
            for name, rows in (("uk", uk.transpose(1, 2)), ("uv", uv)):
                q8, s8 = decode_kernels.quantize_rows_i8(rows)
                self.register_buffer(f"{name}_q", q8)
                self.register_buffer(f"{name}_s", s8)
        else:  # each contiguous for the batched matmuls
            self.w_uk = torch.nn.Parameter(uk.contiguous(), requires_grad=False)  # [H, N, L]
            self.w_uv = torch.nn.Parameter(uv.contiguous(), requires_grad=False)  # [H, V, L]
        self.scale = cfg.softmax_scale
        self.absorb = absorb

    def uk(self) -> torch.Tensor:
        """kv_b's key half [H, N, L] fp32 (dequantized from int8 when held so)."""
        return self.w_uk if self.w_uk is not None else (self.uk_q.float() * self.uk_s[..., None]).transpose(1, 2)

    def uv(self) -> torch.Tensor:
        """kv_b's value half [H, V, L] fp32 (dequantized from int8 when held so)."""
        return self.w_uv if self.w_uv is not None else self.uv_q.float() * self.uv_s[..., None]

    def _per_head(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x [T, H, K] through the held int8 matrices ``name`` ("uk" [H, L, N] or "uv" [H, V, L]) -> [T, H, rows]."""
        q8, s8 = getattr(self, f"{name}_q"), getattr(self, f"{name}_s")
        lib = None if torch.compiler.is_compiling() else decode_kernels.load()
        if lib is not None and decode_kernels.usable(x):
            return decode_kernels.heads_i8(lib, x, q8, s8)
        return decode_kernels.heads_i8_reference(x, q8, s8)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, batch: BatchLayout
    ) -> torch.Tensor:
        # x: [T, D]; cos/sin: [T, 1, R]
        c, t, h = self.cfg, x.shape[0], self.num_heads
        q = self.q_in(x) if self.q_b is None else self.q_b(self.q_a_norm(self.q_in(x)))  # [T, H (N + R)]
        q_nope, q_pe = q.view(t, h, c.qk_head_dim).split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)  # [T, L], [T, R]
        latent = self.kv_a_norm(latent)
        rope = apply_rope_pairs if c.interleaved_rope else apply_rope
        q_pe, k_pe = rope(q_pe, cos, sin), rope(k_pe.unsqueeze(1), cos, sin)  # [T, H, R], [T, 1, R]
        if self.absorb:
            if self.w_uk is None:
                q_lat = self._per_head(q_nope, "uk")  # [T, H, L]
            else:
                q_lat = torch.einsum("thn,hnl->thl", q_nope, self.w_uk)  # [T, H, L]
            query = torch.cat([q_lat, q_pe], dim=-1)  # [T, H, L + R]
            key = torch.cat([latent.unsqueeze(1), k_pe], dim=-1)  # [T, 1, L + R]
            out_lat = cache.attend(self.layer, query, key, None, batch, self.scale)  # [T, H, L]
            if self.w_uv is None:
                out = self._per_head(out_lat, "uv")  # [T, H, V]
            else:
                out = torch.einsum("thl,hvl->thv", out_lat, self.w_uv)  # [T, H, V]
        else:
            k_nope = torch.einsum("tl,hnl->thn", latent, self.uk())  # [T, H, N]: kv_b_proj's key rows
            v = torch.einsum("tl,hvl->thv", latent, self.uv())  # [T, H, V]: its value rows
            key = torch.cat([k_nope, k_pe.expand(t, h, c.qk_rope_head_dim)], dim=-1)  # [T, H, N + R]
            query = torch.cat([q_nope, q_pe], dim=-1)
            out = cache.attend(self.layer, query, key, v, batch, self.scale)  # [T, H, V]
        return self.o_proj(out.reshape(t, h * c.v_head_dim))


def latent_cache(kv: str, num_layers: int, cfg: MLAConfig) -> KVCache:
    """The absorbed path's cache: one KV head, key [c ; k_pe], value = the key's first L numbers."""
    from ..kvcache.spec import make_cache

    return make_cache(kv, num_layers, 1, cfg.latent_dim, value_dim=cfg.kv_lora_rank, values_in_keys=True)


def naive_cache(num_layers: int, num_heads: int, cfg: MLAConfig) -> KVCache:
    """The reference path's cache: H KV heads of decompressed keys [N + R] and values [V]."""
    from ..kvcache.dense import DenseKVCache

    return DenseKVCache(num_layers, num_heads, cfg.qk_head_dim, value_dim=cfg.v_head_dim)
