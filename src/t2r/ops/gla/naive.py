"""Slow twin of gated linear attention: the masked quadratic form straight from the definition, with the full
[T, T, F] cumulative log decays. Every fast path in chunk.py and recurrent.py is tested against it. Inputs are
float32, laid out [B, T, H, dim]; it returns unnormalised (num, den) plus the final state."""

from __future__ import annotations

import torch

from ..common import LinearState


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Log decay between steps: out[..., t, s, :] = sum of x[..., u, :] over s < u <= t (0 if s == t, -inf if s > t).

    x: [..., L, F] log decays (<= 0, -inf allowed) -> [..., L, L, F]. Built by masking x and summing along t, so no
    two cumulative sums are ever subtracted: exact 0s stay 0, -inf never meets -inf (no NaN, forward or backward).
    """
    L = x.shape[-2]
    pos = torch.arange(L, device=x.device)
    later = (pos[:, None] > pos[None, :]).unsqueeze(-1)  # [L, L, 1]  row after column
    steps = torch.where(later, x.unsqueeze(-2), 0.0)  # [..., L, L, F]  steps[u, s] = x_u if u > s
    out = steps.cumsum(-3)  # [..., L, L, F]
    return out.masked_fill(later.transpose(0, 1), float("-inf"))  # s > t: no decay path, weight 0


def with_ones(v: torch.Tensor, S0: torch.Tensor, z0: torch.Tensor):
    """v with a column of ones appended, and (S0, z0) as one [B, H, F, D + 1] state: den is then the last column."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1), torch.cat([S0, z0.unsqueeze(-1)], -1)


def gated_linear_attention_quadratic_terms(phi_q, phi_k, v, g, S0, z0):
    """Gated linear attention from the definition: weight(t, s) = phi_q_t . exp(sum_{s<u<=t} g_u) phi_k_s for s <= t.

    phi_q, phi_k, g: [B, T, H, F]; v: [B, T, H, D]; S0: [B, H, F, D]; z0: [B, H, F]. Returns num [B, T, H, D],
    den [B, T, H] and the final LinearState.
    """
    D = v.shape[-1]
    v1, S1 = with_ones(v, S0, z0)  # [B, T, H, D+1], [B, H, F, D+1]
    q, k, gh, vh = (x.transpose(1, 2) for x in (phi_q, phi_k, g, v1))  # [B, H, T, *]
    decay = segsum(gh).exp()  # [B, H, T, T, F]
    A = torch.einsum("bhtf,bhtsf,bhsf->bhts", q, decay, k)  # [B, H, T, T]
    into = gh.cumsum(2)  # [B, H, T, F]  log decay of the initial state by step t
    out = A @ vh + (q * into.exp()) @ S1  # [B, H, T, D+1]
    kv_end = (k * decay[:, :, -1]).transpose(-1, -2) @ vh  # [B, H, F, D+1]  keys decayed to the last step
    S_end = into[:, :, -1].exp().unsqueeze(-1) * S1 + kv_end  # [B, H, F, D+1]
    out = out.transpose(1, 2)  # [B, T, H, D+1]
    return out[..., :D], out[..., D], LinearState(S_end[..., :D], S_end[..., D])
