"""Closed form of the (gated) delta rule over a whole block of tokens: the UT transform, T x T.

With u_t = beta_t (v_t - a_t S_{t-1}^T k_t) the recurrence reads S_t = a_t S_{t-1} + k_t u_t^T, so
S_t = gamma_t S0 + sum_{s<=t} Gamma_ts k_s u_s^T with gamma_t = prod_{r<=t} a_r, Gamma_ts = prod_{s<r<=t} a_r.
Then u solves the unit lower-triangular system (I + L) u = diag(beta) (V - diag(gamma) K S0) with
L_ts = beta_t (k_t . k_s) Gamma_ts for s < t, and o = diag(gamma) Q S0 + (Q K^T o Gamma) u.
The chunked form (chunk.py) applies the same block terms per chunk; both are tested against the token loop.
Inputs are float32 with the head axis first: [B, H, L, dim], log decays [B, H, L].
"""

from __future__ import annotations

import torch

from ..common import DeltaState


def decay_matrix(g: torch.Tensor) -> torch.Tensor:
    """exp of the segment sums of log decays, with a leading "before the block" step.

    g: [..., L] (<= 0, -inf allowed). Returns E [..., L+1, L+1] with E[i, j] = exp(sum_{j < r <= i} g_{r-1}) for
    j <= i and 0 above the diagonal: E[1:, 1:] = Gamma, E[1:, 0] = gamma (from the block start), E[-1, 1:] = decay
    from each step to the block end. The sums are cumulated from 0 with the mask applied first, so no
    -inf - (-inf) is ever formed (the difference of two cumulative sums would be NaN after a zero decay).
    """
    L = g.shape[-1]
    g0 = torch.cat([torch.zeros_like(g[..., :1]), g], -1)  # [..., L+1]
    idx = torch.arange(L + 1, device=g.device)  # [L+1]
    x = g0.unsqueeze(-1).expand(*g0.shape, L + 1)  # [..., L+1, L+1]  x[i, j] = g0_i
    x = x.masked_fill(idx[:, None] <= idx[None, :], 0.0)  # [..., L+1, L+1]  kept for i > j only
    seg = x.cumsum(-2).masked_fill(idx[:, None] < idx[None, :], float("-inf"))  # [..., L+1, L+1]
    return torch.exp(seg)  # [..., L+1, L+1]


def block_terms(q, k, v, beta, g):
    """The per-block pieces of the UT transform. q, k: [..., L, F]; v: [..., L, D]; beta, g: [..., L].

    Returns U = T diag(beta) V [..., L, D], W = T diag(beta gamma) K [..., L, F] (T = (I + L)^-1, so that
    u = U - W S0), A = Q K^T o Gamma [..., L, L], gamma [..., L] and to_end = the decay from each step to the
    block end [..., L]; gamma[..., -1] is the decay of the whole block.
    """
    E = decay_matrix(g)  # [..., L+1, L+1]
    Gamma, gamma, to_end = E[..., 1:, 1:], E[..., 1:, 0], E[..., -1, 1:]  # [..., L, L], [..., L], [..., L]
    KK = (k @ k.transpose(-1, -2)) * Gamma  # [..., L, L]
    Lw = (beta.unsqueeze(-1) * KK).tril(-1)  # [..., L, L]
    rhs = torch.cat([beta.unsqueeze(-1) * v, (beta * gamma).unsqueeze(-1) * k], -1)  # [..., L, D+F]
    eye = torch.eye(Lw.shape[-1], dtype=Lw.dtype, device=Lw.device)  # [L, L]
    sol = torch.linalg.solve_triangular(eye + Lw, rhs, upper=False, unitriangular=True)  # [..., L, D+F]
    U, W = sol.split([v.shape[-1], k.shape[-1]], -1)  # [..., L, D], [..., L, F]
    A = (q @ k.transpose(-1, -2)) * Gamma  # [..., L, L]  (Gamma is 0 above the diagonal)
    return U, W, A, gamma, to_end


def read_and_update(S0, q, k, U, W, A, gamma, to_end):
    """Outputs of a block from its start state, and the state at its end. S0: [..., F, D]."""
    u = U - W @ S0  # [..., L, D]
    o = gamma.unsqueeze(-1) * (q @ S0) + A @ u  # [..., L, D]
    S = gamma[..., -1, None, None] * S0 + (to_end.unsqueeze(-1) * k).transpose(-1, -2) @ u  # [..., F, D]
    return o, S


def delta_rule_quadratic(q, k, v, beta, g, S0):
    """The delta rule over the whole sequence in one T x T block. q, k: [B, H, T, F]; v: [B, H, T, D];
    beta, g: [B, H, T]; S0: [B, H, F, D]. Returns o [B, H, T, D] and the final DeltaState."""
    U, W, A, gamma, to_end = block_terms(q, k, v, beta, g)
    o, S = read_and_update(S0, q, k, U, W, A, gamma, to_end)
    return o, DeltaState(S)


def delta_rule_weights_quadratic(q, k, beta, g):
    """A [B, H, T, T] with o = A v from a zero state: (Q K^T o Gamma) (I + L)^-1 diag(beta)."""
    E = decay_matrix(g)  # [B, H, T+1, T+1]
    Gamma = E[..., 1:, 1:]  # [B, H, T, T]
    Lw = (beta.unsqueeze(-1) * (k @ k.transpose(-1, -2)) * Gamma).tril(-1)  # [B, H, T, T]
    eye = torch.eye(Lw.shape[-1], dtype=Lw.dtype, device=Lw.device)  # [T, T]
    Tb = torch.linalg.solve_triangular(eye + Lw, torch.diag_embed(beta), upper=False, unitriangular=True)
    return ((q @ k.transpose(-1, -2)) * Gamma) @ Tb  # [B, H, T, T]
