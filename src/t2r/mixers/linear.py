"""The paper's recurrence and its LoLCATs hybrid: plain causal linear attention (`linear`), and a sliding softmax window
beside it with one shared normaliser (`window`)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RecipeError
from ..ops import linear_attention, sliding_window_linear_attention
from ..ops.common import window_weights
from .base import MIXERS, WINDOW_ONLY_LOGIT, Mixer, causal_offsets


def linear_weights(phi_q: torch.Tensor, phi_k: torch.Tensor) -> torch.Tensor:
    """[B, H, T, T] phi(q_t) . phi(k_j) (every pair; callers mask)."""
    return torch.einsum("bthf,bshf->bhts", phi_q, phi_k)


def window_part_weights(scores: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, T, T] exp(s - max) on the last `window` keys of each query, 0 elsewhere."""
    diff = causal_offsets(scores.shape[-1], scores.device)  # (T, T)
    return window_weights(scores, (diff >= 0) & (diff < window))


def window_only(mixer: Mixer) -> "WindowMixer":
    """Sliding-window softmax attention alone (the recurrent part weighted 0): any windowed mixer without its
    recurrence."""
    ablated = WindowMixer(num_heads=mixer.num_heads, scale=mixer.scale, window=mixer.window,
                          chunk_size=mixer.chunk_size, eps=mixer.eps)
    ablated.window_logit = nn.Parameter(torch.full_like(mixer.window_logit, WINDOW_ONLY_LOGIT), requires_grad=False)
    return ablated


@MIXERS.register("linear")
class LinearMixer(Mixer):
    """Plain causal linear attention: the T2R paper's recurrence."""

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.window:
            raise RecipeError(f"the linear mixer has no softmax window (window={recipe.window}): use mixer 'window', "
                              "or window 0")

    def forward(self, q, k, v, phi_q, phi_k, *, key_mask=None, state=None, mode="chunk", output_final_state=False):
        return linear_attention(phi_q, phi_k, v, key_mask=key_mask, causal=True, mode=mode, initial_state=state,
                                output_final_state=output_final_state, **self._options())

    def weights(self, scores, phi_q, phi_k, *, v=None):
        return linear_weights(phi_q, phi_k) * (causal_offsets(scores.shape[-1], scores.device) >= 0)


@MIXERS.register("window")
class WindowMixer(Mixer):
    """A sliding softmax window over the last `window` keys beside linear attention over the older ones (LoLCATs)."""

    def __init__(self, *, num_heads: int, scale: float, window: int = 0, chunk_size: int = 64,
                 eps: float = 1e-6) -> None:
        super().__init__(num_heads=num_heads, scale=scale, window=window, chunk_size=chunk_size, eps=eps)
        # sigmoid(0) = 0.5: softmax window and linear part start with equal weight (LoLCATs)
        self.window_logit = nn.Parameter(torch.zeros(num_heads))

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if not recipe.window:
            raise RecipeError("the window mixer needs window >= 1 (the number of recent tokens under softmax)")

    def factor(self) -> torch.Tensor:
        """f_h in (0, 1): the weight of the softmax window, per head [H]."""
        return torch.sigmoid(self.window_logit)

    def forward(self, q, k, v, phi_q, phi_k, *, key_mask=None, state=None, mode="chunk", output_final_state=False):
        return sliding_window_linear_attention(
            q, k, v, phi_q, phi_k, window=self.window, window_factor=self.factor(), scale=self.scale,
            key_mask=key_mask, mode=mode, initial_state=state, output_final_state=output_final_state,
            **self._options())

    def without(self, part: str) -> Mixer:
        """"linear": only the softmax window (f_h = 1), i.e. sliding-window softmax attention; "window": the linear
        part alone over every key (a linear mixer with the same feature maps)."""
        if part == "window":
            return LinearMixer(num_heads=self.num_heads, scale=self.scale, chunk_size=self.chunk_size, eps=self.eps)
        if part == "linear":
            return window_only(self)
        return super().without(part)

    def weights(self, scores, phi_q, phi_k, *, v=None):
        diff = causal_offsets(scores.shape[-1], scores.device)  # (T, T)
        f = self.factor().view(1, -1, 1, 1)  # (1, H, 1, 1)
        return f * window_part_weights(scores, self.window) + (1 - f) * linear_weights(phi_q, phi_k) * (
            diff >= self.window)
