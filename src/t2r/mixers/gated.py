"""Gated linear attention (`gla`): linear attention whose state forgets. Per head, feature and token a decay
a_t in (0, 1)^F scales the state before the token is added,

    S_t = diag(a_t) S_{t-1} + phi(k_t) v_t^T,   z_t = a_t * z_{t-1} + phi(k_t),   o_t = phi(q_t)^T S_t / phi(q_t)^T z_t,

with a_t = sigmoid(W_h v_t + b_h) computed from the token's value vector (the pretrained value projection of the layer
input, no positions). W starts at zero and b at logit(decay_init) (default 0.999): right after the swap every decay is
the same number close to 1, i.e. nearly the paper's plain linear attention, and attention transfer teaches the gates
what to forget. With `window` >= 1 a sliding softmax window sits beside it, as in the `window` mixer: the gated part
reads the keys older than the window, one normaliser is shared, and the state keeps decaying while they wait."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gated_linear_attention, gated_linear_attention_weights, sliding_window_linear_attention
from .base import MIXERS, HeadProjection, Mixer, causal_offsets, check_probability, logit
from .linear import LinearMixer, WindowMixer, window_only, window_part_weights


def delayed(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x [B, T, ...] moved `steps` later along time, zeros first: delayed(x)[:, t] = x[:, t - steps]."""
    if steps == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], min(steps, x.shape[1]), *x.shape[2:]), x[:, :-steps]], 1)[:, :x.shape[1]]


def undelay_columns(w: torch.Tensor, steps: int) -> torch.Tensor:
    """Weights [B, H, T, T] over a key stream delayed by `steps` -> the same weights over the original keys."""
    if steps == 0:
        return w
    out = torch.zeros_like(w)
    out[..., :w.shape[-1] - steps] = w[..., steps:]
    return out


@MIXERS.register("gla")
class GatedLinearMixer(Mixer):
    """Gated linear attention with a data-dependent per-feature decay (and optionally a sliding softmax window)."""

    def __init__(self, *, num_heads: int, scale: float, head_dim: int, feature_dim: int, window: int = 0,
                 chunk_size: int = 64, eps: float = 1e-6, decay_init: float = 0.999) -> None:
        super().__init__(num_heads=num_heads, scale=scale, window=window, chunk_size=chunk_size, eps=eps)
        check_probability("decay_init", decay_init)
        self.gate = HeadProjection(num_heads, head_dim, feature_dim, logit(decay_init))
        if window:
            self.window_logit = nn.Parameter(torch.zeros(num_heads))

    def log_decay(self, v: torch.Tensor) -> torch.Tensor:
        """log a_t, [B, T, H, F] float32, <= 0."""
        return F.logsigmoid(self.gate(v))

    def factor(self) -> torch.Tensor:
        """f_h in (0, 1): the weight of the softmax window, per head [H]."""
        return torch.sigmoid(self.window_logit)

    def forward(self, q, k, v, phi_q, phi_k, *, key_mask=None, state=None, mode="chunk", output_final_state=False):
        g = self.log_decay(v)  # (B, T, H, F)
        common = dict(key_mask=key_mask, mode=mode, initial_state=state, output_final_state=output_final_state,
                      **self._options())
        if self.window:
            return sliding_window_linear_attention(q, k, v, phi_q, phi_k, window=self.window,
                                                   window_factor=self.factor(), scale=self.scale, log_decay=g,
                                                   **common)
        return gated_linear_attention(phi_q, phi_k, v, g, **common)

    def weights(self, scores, phi_q, phi_k, *, v=None):
        if v is None:
            raise ValueError("the gla mixer's weights need the values v: its gates are computed from them")
        g = self.log_decay(v)  # (B, T, H, F)
        gated = undelay_columns(gated_linear_attention_weights(phi_q, delayed(phi_k, self.window), g), self.window)
        if not self.window:
            return gated
        f = self.factor().view(1, -1, 1, 1)  # (1, H, 1, 1)
        visible = causal_offsets(scores.shape[-1], scores.device) >= self.window  # (T, T)
        return f * window_part_weights(scores, self.window) + (1 - f) * gated * visible

    def without(self, part: str) -> Mixer:
        """"window": the gated part alone over every key; "linear": the softmax window alone; "gate": every decay 1
        (the same model with the plain linear recurrence of the `linear` / `window` mixers)."""
        if part == "window" and self.window:
            alone = GatedLinearMixer(num_heads=self.num_heads, scale=self.scale, head_dim=self.gate.head_dim,
                                     feature_dim=self.gate.out, chunk_size=self.chunk_size, eps=self.eps)
            alone.gate = self.gate
            return alone
        if part == "linear" and self.window:
            return window_only(self)
        if part == "gate":
            options = dict(num_heads=self.num_heads, scale=self.scale, chunk_size=self.chunk_size, eps=self.eps)
            if not self.window:
                return LinearMixer(**options)
            plain = WindowMixer(window=self.window, **options)
            plain.window_logit = self.window_logit
            return plain
        return super().without(part)
