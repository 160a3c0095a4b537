"""Attention of one sequence over a TurboQuant history (codes) plus exact recent keys/values.

Keys are laid out by position: [lo, coded) come from codes, the rest from ``exact_k/exact_v``
(the full-precision window followed by the current chunk). Two implementations:

* ``attend_codes`` never rebuilds keys or values in the original basis. The query is rotated
  once (<q, k> = <q R, k R> for orthogonal R), scores are norm * <q_rot, centroid[code]>, and
  the values are summed in the rotated basis (weights * norms * centroids), rotated back once.
* ``attend_dequant`` is the plain reference: decode every coded vector, concatenate, and call
  scaled_dot_product_attention. Tests check that the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import causal_mask
from .quantizer import TurboQuantizer
from .sinks import attend_with_sinks, softmax_with_sinks


@dataclass
class CodedHistory:
    """One layer's coded keys/values of one sequence, positions [0, capacity)."""

    k_codes: torch.Tensor  # [Hkv, words, cap] int32, coordinate-major bit-packed codes
    k_norms: torch.Tensor  # [Hkv, cap] float16
    v_codes: torch.Tensor  # [Hkv, words, cap] int32
    v_norms: torch.Tensor  # [Hkv, cap] float16


def _visible(start: int, n: int, window: int | None) -> tuple[int, torch.Tensor | None]:
    """First key position any of the n queries can see, and the mask over [lo, start + n)."""
    lo = 0 if window is None else max(0, start - window + 1)
    mask = causal_mask(n, start, window)
    return lo, (None if mask is None else mask[:, lo:])


def attend_codes(
    tq: TurboQuantizer,
    q: torch.Tensor,
    hist: CodedHistory,
    coded: int,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    start: int,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [n, Hq, Dh] for positions [start, start + n); exact_k/v: [Hkv, start + n - coded, Dh]
    for positions [coded, start + n) -> [n, Hq, Dh]. exact_v may be narrower (Dv < Dh) when the
    values are the keys' prefixes (the value codes are then the key codes): output [n, Hq, Dv]."""
    n, hq, dh = q.shape
    hkv, dv = exact_k.shape[0], exact_v.shape[-1]
    g = hq // hkv
    lo, mask = _visible(start, n, window)
    nc = max(0, coded - lo)  # coded keys in view
    e0 = max(lo, coded) - coded  # first exact key in view
    qg = (q * scale).view(n, hkv, g, dh).permute(1, 2, 0, 3).reshape(hkv, g * n, dh)  # [Hkv, G n, Dh]
    scores = torch.bmm(qg, exact_k[:, e0:].transpose(1, 2))  # [Hkv, G n, Ne]
    if nc:
        q_rot = tq.rotate(qg).split(tq.sizes, dim=-1)  # per group [Hkv, G n, n_g]
        kc = tq.centroids_t(hist.k_codes[:, :, lo:coded])  # per group [Hkv, n_g, nc]: rotated unit keys
        sc = torch.bmm(q_rot[0], kc[0])  # [Hkv, G n, nc]
        for qp, kp in zip(q_rot[1:], kc[1:]):
            sc.baddbmm_(qp, kp)
        sc *= hist.k_norms[:, lo:coded].float().unsqueeze(1)
        scores = torch.cat([sc, scores], dim=-1)  # keys in position order
    if mask is not None:
        scores.view(hkv, g, n, -1).masked_fill_(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1) if sinks is None else softmax_with_sinks(scores, sinks, n)  # [Hkv, G n, nc + Ne]
    out = torch.bmm(p[..., nc:], exact_v[:, e0:])  # [Hkv, G n, Dv]
    if nc:
        vc = tq.centroids_t(hist.v_codes[:, :, lo:coded])  # per group [Hkv, n_g, nc]: rotated unit values
        pw = p[..., :nc] * hist.v_norms[:, lo:coded].float().unsqueeze(1)  # [Hkv, G n, nc]
        o_rot = torch.cat([torch.bmm(pw, vp.transpose(1, 2)) for vp in vc], dim=-1)  # [Hkv, G n, Dh]
        out += tq.unrotate(o_rot)[..., :dv]  # one rotation back for the whole sum
    return out.view(hkv, g, n, dv).permute(2, 0, 1, 3).reshape(n, hq, dv)


def dequantized_history(tq: TurboQuantizer, hist: CodedHistory, coded: int, exact_k: torch.Tensor,
                        exact_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's keys and values: the coded history decoded, then the exact tokens
    ([Hkv, L, Dh] and [Hkv, L, Dv]; Dv < Dh when the values are the keys' prefixes)."""
    keys = torch.cat([tq.decode_t(hist.k_codes[:, :, :coded], hist.k_norms[:, :coded]), exact_k], dim=1)
    dv = exact_v.shape[-1]
    values = torch.cat([tq.decode_t(hist.v_codes[:, :, :coded], hist.v_norms[:, :coded])[..., :dv], exact_v], dim=1)
    return keys, values


def attend_dequant(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float,
                   window: int | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for ``attend_codes``: standard attention over ``dequantized_history``'s keys and
    values. q: [n, Hq, Dh] at positions [start, start + n) -> [n, Hq, Dv]."""
    lo, mask = _visible(start, q.shape[0], window)
    if sinks is not None:
        return attend_with_sinks(q.transpose(0, 1), keys[:, lo:], values[:, lo:], mask, scale, sinks).transpose(0, 1)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys[:, lo:], values[:, lo:], attn_mask=mask, scale=scale, enable_gqa=True
    )  # [Hq, n, Dv]
    return o.transpose(0, 1)
