"""Token-by-token recurrent forms (decoding): a Python loop over t that updates the state, then reads
it out. Built for T == 1: one outer-product update and one [F] x [F, D] product per head."""

from __future__ import annotations

import torch

from ..common import LinearState


def linear_attention_recurrent_terms(phi_q, phi_k, v, S, z):
    """Causal linear attention, one token at a time. phi_*: [B, T, H, F], v: [B, T, H, D], float32."""
    if phi_q.shape[1] == 1:  # a decode step: the same products, without the loop's indexing and stacking
        k_t = phi_k[:, 0]  # [B, H, F]
        S = torch.addcmul(S, k_t.unsqueeze(-1), v.transpose(1, 2))  # [B, H, F, D]
        z = z + k_t  # [B, H, F]
        num = torch.matmul(phi_q.transpose(1, 2), S).transpose(1, 2)  # [B, 1, H, D]
        return num, (phi_q * z.unsqueeze(1)).sum(-1), LinearState(S, z)  # den: [B, 1, H]
    nums, dens = [], []
    for t in range(phi_q.shape[1]):
        k_t, q_t = phi_k[:, t], phi_q[:, t]  # [B, H, F]
        S = torch.addcmul(S, k_t.unsqueeze(-1), v[:, t].unsqueeze(-2))  # [B, H, F, D]
        z = z + k_t  # [B, H, F]
        nums.append(torch.matmul(q_t.unsqueeze(-2), S).squeeze(-2))  # [B, H, D]
        dens.append((q_t * z).sum(-1))  # [B, H]
    return torch.stack(nums, 1), torch.stack(dens, 1), LinearState(S, z)
