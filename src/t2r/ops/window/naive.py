"""Slow twin of the sliding-window + linear hybrid: the definition with full (P+T)^2 masks. The chunked and recurrent
forms are tested against it. Inputs are float32, laid out [B, T, H, dim]; it returns unnormalised (num, den) plus the
final state. Gated: the decays along the way come from the full [L, L, F] cumulative log decays (gla.naive.segsum)."""

from __future__ import annotations

import torch

from ..common import WindowState, window_weights
from ..gla.naive import segsum


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


def _older_decay(g, P: int, window: int) -> torch.Tensor:
    """[B, H, L, L, F]: entry [t, j] = exp(sum of g_u over j + window < u <= t), the decay an old key j has gathered by
    step t since it entered the state at step j + window (0 when j + window > t). g: [B, T, H, F]; L = P + T; the P
    buffered positions have no decay of their own (their keys enter at steps >= P + 1 anyway)."""
    B, T, H, F = g.shape
    L = P + T
    gc = torch.cat([g.new_zeros(B, P, H, F), g], 1).transpose(1, 2)  # [B, H, L, F]
    seg = segsum(gc)  # [B, H, L, L, F]  [t, e]: decay from step e to step t
    never = seg.new_full((B, H, L, min(window, L), F), float("-inf"))  # keys that enter after the stream ends
    return torch.cat([seg[:, :, :, window:], never], 3).exp()  # [B, H, L, L, F]  column j: entry step j + window


def sliding_window_quadratic_terms(q, k, v, phi_q, phi_k, window, f, scale, valid, state, g=None):
    """Sliding softmax window + linear attention from the definition, with full (P+T)^2 masks.

    q, k: [B, T, H, Dk]; v: [B, T, H, D]; phi_q, phi_k: [B, T, H, F]; f: [H]; valid: [B, T] bool;
    state: WindowState (P = window buffered tokens) or None (P = 0); g: [B, T, H, F] log decays of the linear
    part (gated) or None.
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
    if g is None:
        b = (1 - fh) * torch.einsum("bthf,bshf->bhts", phi_q, pkc) * older  # [B, H, T, L]
    else:
        decay = _older_decay(g, P, window)  # [B, H, L, L, F]
        b = (1 - fh) * torch.einsum("bthf,bhtsf,bshf->bhts", phi_q, decay[:, :, P:], pkc) * older  # [B, H, T, L]
    num = torch.einsum("bhts,bshd->bthd", a + b, vc)  # [B, T, H, D]
    den = (a + b).sum(-1).transpose(1, 2)  # [B, T, H]
    F_, D = phi_q.shape[-1], v.shape[-1]
    S0 = q.new_zeros(B, H, F_, D) if state is None else state.S  # [B, H, F, D]
    z0 = q.new_zeros(B, H, F_) if state is None else state.z  # [B, H, F]
    q_S0 = phi_q if g is None else phi_q * g.cumsum(1).exp()  # [B, T, H, F]  (S0, z0) decays from the first step
    num = num + (1 - f)[:, None] * torch.einsum("bthf,bhfd->bthd", q_S0, S0)  # [B, T, H, D]
    den = den + (1 - f) * torch.einsum("bthf,bhf->bth", q_S0, z0)  # [B, T, H]
    evicted = (pos <= L - 1 - window)[None, :] & validc  # [B, L]
    pk_old = pkc * evicted[:, :, None, None]  # [B, L, H, F]
    if g is not None:  # decayed to the last step; so is the initial state
        pk_old = pk_old * decay[:, :, -1].transpose(1, 2)  # [B, L, H, F]
        S0, z0 = g.sum(1).exp().unsqueeze(-1) * S0, g.sum(1).exp() * z0  # [B, H, F, D], [B, H, F]
    S = S0 + torch.einsum("bshf,bshd->bhfd", pk_old, vc)  # [B, H, F, D]
    z = z0 + pk_old.sum(1)  # [B, H, F]
    buffers = [_last_window(x, window, 0.0).transpose(1, 2) for x in (kc, vc, pkc)]  # [B, H, W, *]
    return num, den, WindowState(S, z, *buffers, _last_window(validc, window, False))
