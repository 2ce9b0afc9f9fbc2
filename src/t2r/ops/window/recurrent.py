"""The sliding-window + linear hybrid one token at a time (decoding)."""

from __future__ import annotations

import torch

from ..common import WindowState, window_weights


def _push(buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Drop the oldest entry of a [B, H, W, *] (or [B, W]) buffer and append x at the end."""
    if buffer.dim() == 4:
        return torch.cat([buffer[:, :, 1:], x.unsqueeze(2)], 2)
    return torch.cat([buffer[:, 1:], x.unsqueeze(1)], 1)


def sliding_window_recurrent_terms(q, k, v, phi_q, phi_k, window, f, scale, valid, state, g=None):
    """Sliding softmax window + linear attention, one token at a time.

    Each step first decays (S, z) by exp(g_t) when gated, moves the oldest buffered token (position t - window)
    into (S, z), then pushes token t into the buffers and reads out. Inputs as in naive.sliding_window_quadratic_terms;
    state: a full WindowState (buffers of length `window`, float32).
    """
    S, z, kb, vb, pb, ok = state
    fh = f[:, None]  # [H, 1]
    decay = None if g is None else g.exp()  # [B, T, H, F]
    nums, dens = [], []
    for t in range(q.shape[1]):
        if decay is not None:
            S, z = decay[:, t].unsqueeze(-1) * S, decay[:, t] * z  # [B, H, F, D], [B, H, F]
        S = torch.addcmul(S, pb[:, :, 0].unsqueeze(-1), vb[:, :, 0].unsqueeze(-2))  # [B, H, F, D]
        z = z + pb[:, :, 0]  # [B, H, F]
        kb, vb, pb = _push(kb, k[:, t]), _push(vb, v[:, t]), _push(pb, phi_k[:, t])  # [B, H, W, *]
        ok = _push(ok, valid[:, t])  # [B, W]
        scores = scale * torch.einsum("bhd,bhwd->bhw", q[:, t], kb)  # [B, H, W]
        e = window_weights(scores, ok[:, None, :])  # [B, H, W]
        num_w = torch.einsum("bhw,bhwd->bhd", e, vb)  # [B, H, D]
        q_t = phi_q[:, t]  # [B, H, F]
        num_l = torch.matmul(q_t.unsqueeze(-2), S).squeeze(-2)  # [B, H, D]
        nums.append(fh * num_w + (1 - fh) * num_l)  # [B, H, D]
        dens.append(f * e.sum(-1) + (1 - f) * (q_t * z).sum(-1))  # [B, H]
    return torch.stack(nums, 1), torch.stack(dens, 1), WindowState(S, z, kb, vb, pb, ok)
