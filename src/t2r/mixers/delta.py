"""The delta rule (`delta`, DeltaNet) and the gated delta rule (`gated_delta`, Gated DeltaNet): a state that
overwrites. Each token first reads what the state holds for its key and replaces a fraction beta_t of it,

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t,

on feature-mapped queries and keys normalised to unit length (k = phi(k) / |phi(k)|), with beta_t = sigmoid(w_h . v_t
+ b_h) and, for `gated_delta`, a per-head decay a_t = sigmoid(u_h . v_t + c_h) (a_t = 1 for `delta`), both from the
token's value vector; the weights start at zero, beta at `beta_init` and a at `decay_init`. There is no normaliser:
the output is a signed mix of values (`normalised = False`), so stage 1 trains these mixers on the output error, not
on attention rows. With `window` >= 1 a sliding softmax window sits beside the memory, which then holds only the keys
older than the window: o_t = f_h softmax-window(q_t) + (1 - f_h) S_{t-window}'s reading of q_t once a token has
entered the memory, and the softmax window alone before (t < window from the start of a sequence)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import delta_rule, delta_rule_weights, sliding_window_delta_rule
from .base import MIXERS, HeadProjection, Mixer, causal_offsets, check_probability, logit
from .gated import delayed, undelay_columns
from .linear import window_only, window_part_weights


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last dim, in float32 or float64 (0 stays 0)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=1e-6)


@MIXERS.register("delta")
class DeltaMixer(Mixer):
    """The delta rule on unit-length feature keys, with a learned per-head, per-token write strength beta."""

    normalised = False
    gated = False

    def __init__(self, *, num_heads: int, scale: float, head_dim: int, window: int = 0, chunk_size: int = 64,
                 eps: float = 1e-6, beta_init: float = 0.5) -> None:
        super().__init__(num_heads=num_heads, scale=scale, window=window, chunk_size=chunk_size, eps=eps)
        check_probability("beta_init", beta_init)
        self.head_dim = head_dim
        self.beta = HeadProjection(num_heads, head_dim, 0, logit(beta_init))
        if window:
            self.window_logit = nn.Parameter(torch.zeros(num_heads))

    def factor(self) -> torch.Tensor:
        """f_h in (0, 1): the weight of the softmax window, per head [H]."""
        return torch.sigmoid(self.window_logit)

    def gates(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(beta [B, T, H] in (0, 1), log decay [B, T, H] or None), float32."""
        return torch.sigmoid(self.beta(v)), None

    def forward(self, q, k, v, phi_q, phi_k, *, key_mask=None, state=None, mode="chunk", output_final_state=False):
        beta, g = self.gates(v)
        common = dict(log_decay=g, key_mask=key_mask, mode=mode, chunk_size=self.chunk_size, initial_state=state,
                      output_final_state=output_final_state)
        if self.window:
            return sliding_window_delta_rule(q, k, v, unit(phi_q), unit(phi_k), beta, window=self.window,
                                             window_factor=self.factor(), scale=self.scale, eps=self.eps, **common)
        return delta_rule(unit(phi_q), unit(phi_k), v, beta, **common)

    def weights(self, scores, phi_q, phi_k, *, v=None):
        if v is None:
            raise ValueError(f"the {self.name} mixer's weights need the values v: its gates are computed from them")
        beta, g = self.gates(v)
        w = self.window
        memory = delta_rule_weights(unit(phi_q), delayed(unit(phi_k), w), delayed(beta, w), g)  # (B, H, T, T)
        memory = undelay_columns(memory, w)
        if not w:
            return memory
        T = scores.shape[-1]
        live = torch.arange(T, device=scores.device).view(1, 1, T, 1) >= w  # rows whose memory holds a token
        f = torch.where(live, self.factor().view(1, -1, 1, 1), 1.0)  # (1, H, T, 1): the softmax alone before
        soft = window_part_weights(scores, w)
        visible = causal_offsets(T, scores.device) >= w  # (T, T)
        return f * soft / soft.sum(-1, keepdim=True) + (1 - f) * memory * visible

    def _like(self, *, window: int, cls: type | None = None) -> "DeltaMixer":
        """A mixer of class `cls` (default: this one's) sharing this one's parameters, with another window."""
        cls = cls or type(self)
        other = cls.__new__(cls)
        Mixer.__init__(other, num_heads=self.num_heads, scale=self.scale, window=window, chunk_size=self.chunk_size,
                       eps=self.eps)
        other.head_dim, other.beta = self.head_dim, self.beta
        if hasattr(self, "gate") and cls.gated:
            other.gate = self.gate
        if window:
            other.window_logit = self.window_logit
        return other

    def without(self, part: str) -> Mixer:
        """"window": the memory alone over every key; "linear": the softmax window alone; "gate" (gated_delta): every
        decay 1, the plain delta rule."""
        if part == "window" and self.window:
            return self._like(window=0)
        if part == "linear" and self.window:
            return window_only(self)
        if part == "gate" and self.gated:
            return self._like(window=self.window, cls=DeltaMixer)
        return super().without(part)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window={self.window}, normalised keys"


@MIXERS.register("gated_delta")
class GatedDeltaMixer(DeltaMixer):
    """The gated delta rule: the delta rule's memory also decays by a learned per-head, per-token a_t."""

    gated = True

    def __init__(self, *, num_heads: int, scale: float, head_dim: int, window: int = 0, chunk_size: int = 64,
                 eps: float = 1e-6, beta_init: float = 0.5, decay_init: float = 0.999) -> None:
        super().__init__(num_heads=num_heads, scale=scale, head_dim=head_dim, window=window, chunk_size=chunk_size,
                         eps=eps, beta_init=beta_init)
        check_probability("decay_init", decay_init)
        self.gate = HeadProjection(num_heads, head_dim, 0, logit(decay_init))

    def gates(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.sigmoid(self.beta(v)), F.logsigmoid(self.gate(v))
