"""The gated delta rule (Gated DeltaNet's linear attention) for one sequence, with its recurrent state.

Shape legend: n tokens, H value heads, K key dim, Dv value dim; the state S is [H, K, Dv].
Per token t (q, k l2-normalised, q scaled by K^-0.5; g <= 0 a log decay, beta in (0, 1)):

    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T q_t

``recurrent`` is that loop, token by token (the reference, and the decode path: one token).
``chunked`` computes the same in chunks of C tokens (prefill): inside a chunk, with cumulative
log decays c_i, the written values solve a unit lower-triangular system
(I + A) U = beta V - diag(beta exp(c)) K S0 with A_ij = beta_i exp(c_i - c_j) k_i.k_j (j < i),
the outputs are exp(c_i) S0^T q_i + sum_{j <= i} exp(c_i - c_j) (q_i.k_j) u_j, and the state
leaving the chunk is exp(c_C) S0 + sum_j exp(c_C - c_j) k_j u_j^T: a few matmuls per chunk
instead of C dependent steps. The two agree to fp32 rounding (tests/test_delta_rule.py).
"""
from __future__ import annotations

import torch

CHUNK = 64


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [n, H, K], v: [n, H, Dv], g, beta: [n, H], state: [H, K, Dv] -> (out [n, H, Dv], new state)."""
    s = state
    out = v.new_empty(v.shape)
    for t in range(q.shape[0]):
        s = s * g[t].exp()[:, None, None]
        kv = (s * k[t][:, :, None]).sum(dim=1)  # [H, Dv]: what the state already predicts for k_t
        delta = (v[t] - kv) * beta[t][:, None]
        s = s + k[t][:, :, None] * delta[:, None, :]
        out[t] = (s * q[t][:, :, None]).sum(dim=1)
    return out, s


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``recurrent``, chunk by chunk."""
    n = q.shape[0]
    pad = (-n) % chunk
    # [H, N, d] with N padded to whole chunks: padded tokens have g = 0 (no decay), beta = 0 and k = 0
    # (no write), so they leave the state as it was
    q, k, v = (torch.nn.functional.pad(t.transpose(0, 1), (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (torch.nn.functional.pad(t.transpose(0, 1), (0, pad)) for t in (g, beta))
    h, total = q.shape[0], q.shape[1]
    nc = total // chunk
    q, k, v = (t.reshape(h, nc, chunk, t.shape[-1]) for t in (q, k, v))  # [H, NC, C, d]
    g, beta = g.reshape(h, nc, chunk), beta.reshape(h, nc, chunk)
    c = g.cumsum(dim=-1)  # [H, NC, C] cumulative log decay inside each chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [H, NC, C, C]
    kb = k * beta[..., None]
    system = (kb @ k.transpose(-1, -2)) * decay  # only its strictly lower part is read (unit diagonal)
    u0 = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * c.exp()[..., None], upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay  # [H, NC, C, C]
    q_dec = q * c.exp()[..., None]
    k_dec = k * (c[..., -1:] - c).exp()[..., None]  # decay from each token to the chunk's end
    out = torch.empty_like(v)
    s = state
    for i in range(nc):
        u = u0[:, i] - w[:, i] @ s  # [H, C, Dv]
        out[:, i] = q_dec[:, i] @ s + scores[:, i] @ u
        s = s * c[:, i, -1].exp()[:, None, None] + k_dec[:, i].transpose(-1, -2) @ u
    return out.reshape(h, total, -1)[:, :n].transpose(0, 1), s
