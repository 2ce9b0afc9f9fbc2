"""The (gated) delta rule token by token, straight from the definition: the slow twin of the chunked and
quadratic forms, and the decode path (T == 1: one step, no loop). Inputs are float32 with the head axis first:
q, k [B, H, T, F], v [B, H, T, D], beta and log decays g [B, H, T]."""

from __future__ import annotations

import torch

from ..common import DeltaState


def delta_step(S, q_t, k_t, v_t, beta_t, a_t):
    """One token: S <- a S + beta k (v - a S^T k)^T, o = S^T q.

    S: [B, H, F, D]; q_t, k_t: [B, H, F]; v_t: [B, H, D]; beta_t, a_t: [B, H]. Returns (o [B, H, D], S).
    """
    S = a_t[..., None, None] * S  # [B, H, F, D]
    u = beta_t.unsqueeze(-1) * (v_t - (k_t.unsqueeze(-2) @ S).squeeze(-2))  # [B, H, D]
    S = S + k_t.unsqueeze(-1) * u.unsqueeze(-2)  # [B, H, F, D]
    return (q_t.unsqueeze(-2) @ S).squeeze(-2), S  # [B, H, D], [B, H, F, D]


def delta_rule_recurrent(q, k, v, beta, g, S):
    """The delta rule, one token at a time, from the state S [B, H, F, D]. Returns o [B, H, T, D], DeltaState."""
    a = torch.exp(g)  # [B, H, T]
    if q.shape[2] == 1:  # a decode step
        o, S = delta_step(S, q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], a[:, :, 0])
        return o.unsqueeze(2), DeltaState(S)  # [B, H, 1, D]
    outs = []
    for t in range(q.shape[2]):
        o, S = delta_step(S, q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], a[:, :, t])
        outs.append(o)  # [B, H, D]
    return torch.stack(outs, 2), DeltaState(S)  # [B, H, T, D]
