"""Slow twin of the sliding-window + linear hybrid: the definition with full (P+T)^2 masks. The chunked and recurrent
forms are tested against it. Inputs are float32, laid out [B, T, H, dim]; it returns unnormalised (num, den) plus the
final state."""

from __future__ import annotations

import torch

from ..common import WindowState, window_weights


def _stream(new, state, field: str, valid):
    """Buffered tokens (when a state is given) followed by the new ones, invalid slots zeroed."""
    x = new if state is None else torch.cat([getattr(state, field).transpose(1, 2), new], 1)  # [B, P+T, H, *]
    return torch.where(valid[:, :, None, None], x, 0.0)  # [B, P+T, H, *]


def _last_window(x, window: int, fill):
    """The last `window` entries along dim 1, left-padded with `fill` when the stream is shorter."""
    short = window - x.shape[1]
    if short > 0:
        pad = torch.full((x.shape[0], short, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        x = torch.cat([pad, x], 1)
    return x[:, -window:]


def sliding_window_quadratic_terms(q, k, v, phi_q, phi_k, window, f, scale, valid, state):
    """Sliding softmax window + linear attention from the definition, with full (P+T)^2 masks.

    q, k: [B, T, H, Dk]; v: [B, T, H, D]; phi_q, phi_k: [B, T, H, F]; f: [H]; valid: [B, T] bool;
    state: WindowState (P = window buffered tokens) or None (P = 0).
    """
    B, T, H, _ = q.shape
    P = 0 if state is None else window
    validc = valid if state is None else torch.cat([state.valid, valid], 1)  # [B, L]
    kc, vc, pkc = (_stream(x, state, n, validc) for x, n in ((k, "k"), (v, "v"), (phi_k, "phi_k")))
    L = P + T
    pos = torch.arange(L, device=q.device)  # [L]
    diff = pos[P:, None] - pos[None, :]  # [T, L]  query position - key position
    key_ok = validc[:, None, None, :]  # [B, 1, 1, L]
    in_window = (diff >= 0) & (diff < window) & key_ok  # [B, 1, T, L]
    older = (diff >= window) & key_ok  # [B, 1, T, L]
    fh = f.view(1, H, 1, 1)  # [1, H, 1, 1]
    scores = scale * torch.einsum("bthd,bshd->bhts", q, kc)  # [B, H, T, L]
    a = fh * window_weights(scores, in_window)  # [B, H, T, L]
    b = (1 - fh) * torch.einsum("bthf,bshf->bhts", phi_q, pkc) * older  # [B, H, T, L]
    num = torch.einsum("bhts,bshd->bthd", a + b, vc)  # [B, T, H, D]
    den = (a + b).sum(-1).transpose(1, 2)  # [B, T, H]
    F_, D = phi_q.shape[-1], v.shape[-1]
    S0 = q.new_zeros(B, H, F_, D) if state is None else state.S  # [B, H, F, D]
    z0 = q.new_zeros(B, H, F_) if state is None else state.z  # [B, H, F]
    num = num + (1 - f)[:, None] * torch.einsum("bthf,bhfd->bthd", phi_q, S0)  # [B, T, H, D]
    den = den + (1 - f) * torch.einsum("bthf,bhf->bth", phi_q, z0)  # [B, T, H]
    evicted = (pos <= L - 1 - window)[None, :] & validc  # [B, L]
    pk_old = pkc * evicted[:, :, None, None]  # [B, L, H, F]
    S = S0 + torch.einsum("bshf,bshd->bhfd", pk_old, vc)  # [B, H, F, D]
    z = z0 + pk_old.sum(1)  # [B, H, F]
    buffers = [_last_window(x, window, 0.0).transpose(1, 2) for x in (kc, vc, pkc)]  # [B, H, W, *]
    return num, den, WindowState(S, z, *buffers, _last_window(validc, window, False))
