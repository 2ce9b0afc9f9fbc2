"""Gated linear attention token by token (decoding): S_t = exp(g_t) S_{t-1} + phi_k_t v_t^T, z_t likewise, then read
out. Built for T == 1: one decay, one outer-product update and one [F] x [F, D] product per head."""

from __future__ import annotations

import torch

from ..common import LinearState


def gated_linear_attention_recurrent_terms(phi_q, phi_k, v, g, S, z):
    """Gated linear attention, one token at a time. phi_*, g: [B, T, H, F]; v: [B, T, H, D]; float32."""
    a = g.exp()  # [B, T, H, F]  per-step decays in [0, 1]
    if phi_q.shape[1] == 1:  # a decode step: the same products, without the loop's indexing and stacking
        a_t, k_t = a[:, 0], phi_k[:, 0]  # [B, H, F]
        S = torch.addcmul(a_t.unsqueeze(-1) * S, k_t.unsqueeze(-1), v.transpose(1, 2))  # [B, H, F, D]
        z = torch.addcmul(k_t, a_t, z)  # [B, H, F]
        num = torch.matmul(phi_q.transpose(1, 2), S).transpose(1, 2)  # [B, 1, H, D]
        return num, (phi_q * z.unsqueeze(1)).sum(-1), LinearState(S, z)  # den: [B, 1, H]
    nums, dens = [], []
    for t in range(phi_q.shape[1]):
        a_t, k_t, q_t = a[:, t], phi_k[:, t], phi_q[:, t]  # [B, H, F]
        S = torch.addcmul(a_t.unsqueeze(-1) * S, k_t.unsqueeze(-1), v[:, t].unsqueeze(-2))  # [B, H, F, D]
        z = torch.addcmul(k_t, a_t, z)  # [B, H, F]
        nums.append(torch.matmul(q_t.unsqueeze(-2), S).squeeze(-2))  # [B, H, D]
        dens.append((q_t * z).sum(-1))  # [B, H]
    return torch.stack(nums, 1), torch.stack(dens, 1), LinearState(S, z)
