"""Mixers: how feature-mapped queries and keys combine with values into a layer's attention output, one registry entry
each, like the feature maps. A mixer owns its parameters (the window mixing factors; later, gates) and calls its op
in `t2r.ops`, in the mode asked for (chunk | recurrent | quadratic), with key masks for padding and a fixed-size state.

    mixer = build_mixer(recipe, num_heads=H, scale=D ** -0.5)
    o, state = mixer(q, k, v, phi_q, phi_k, key_mask=mask, state=None, mode="chunk", output_final_state=True)
    w = mixer.weights(scores, phi_q, phi_k)   # [B, H, T, T] unnormalised: the quadratic twin, for attention transfer

=======  =====================================================================  ==============  ===========
name     what query t reads                                                     parameters      state
=======  =====================================================================  ==============  ===========
linear   phi(q_t) . phi(k_j) for every j <= t  (T2R, the paper)                  none            (S, z)
window   softmax over the last `window` keys (weight f_h) + linear attention   window_logit    (S, z) + W
         over the older ones (weight 1 - f_h), one shared normaliser (LoLCATs)  [H]             tokens
=======  =====================================================================  ==============  ===========

A new mixer: subclass `Mixer`, implement `forward` and `weights`, decorate with `@MIXERS.register("name")`; recipes
then name it (`Recipe.mixer`) and its keyword options (`Recipe.mixer_options`). Parameters must live on the mixer:
stage 1 (attention transfer) trains every parameter under `.mixer.` with the feature maps.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .errors import RecipeError, T2RError
from .ops import MODES, linear_attention, sliding_window_linear_attention
from .ops.common import window_weights
from .registry import Registry

MIXERS = Registry("mixer", RecipeError)
WINDOW_ONLY_LOGIT = 1e4  # sigmoid(1e4) == 1.0 exactly in float32: the linear part gets weight 0


class Mixer(nn.Module):
    """Base class. `window` and `chunk_size`, `eps` come from the recipe; `scale` is the pretrained softmax scale."""

    name: str = ""

    def __init__(self, *, num_heads: int, scale: float, window: int = 0, chunk_size: int = 64,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.scale, self.window = num_heads, scale, window
        self.chunk_size, self.eps = chunk_size, eps

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Raise RecipeError if `recipe` asks this mixer for something it does not do."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor, *,
                key_mask: torch.Tensor | None = None, state=None, mode: str = "chunk",
                output_final_state: bool = False):
        """q, k: [B, T, H, Dk] (positions applied, heads repeated); v: [B, T, H, D]; phi_q, phi_k: [B, T, H, F]
        float32; key_mask: [B, T] bool (True = real token) or None. Returns (o [B, T, H, D] in v.dtype, state)."""
        raise NotImplementedError

    def weights(self, scores: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor) -> torch.Tensor:
        """The unnormalised weight each query gives each key, [B, H, T, T], from the softmax scores [B, H, T, T]
        (scale q.k) and the feature maps [B, T, H, F]: `weights / weights.sum(-1)` times v is `forward`'s output."""
        raise NotImplementedError

    def without(self, part: str) -> "Mixer":
        """A mixer like this one with `part` switched off (an evaluation-time ablation, `t2r.ablation`); the same
        parameters are shared, not copied. Raises T2RError when the mixer has no such part."""
        raise T2RError(f"the {self.name} mixer has no {part} part to switch off")

    def _options(self) -> dict:
        return {"chunk_size": self.chunk_size, "eps": self.eps}

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window={self.window}"


def _causal(T: int, device) -> torch.Tensor:
    """[T, T] query position - key position."""
    return torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]


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

    def weights(self, scores, phi_q, phi_k):
        linear = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)  # (B, H, T, T)
        return linear * (_causal(scores.shape[-1], scores.device) >= 0)


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
            ablated = WindowMixer(num_heads=self.num_heads, scale=self.scale, window=self.window,
                                  chunk_size=self.chunk_size, eps=self.eps)
            ablated.window_logit = nn.Parameter(torch.full_like(self.window_logit, WINDOW_ONLY_LOGIT),
                                                requires_grad=False)
            return ablated
        return super().without(part)

    def weights(self, scores, phi_q, phi_k):
        diff = _causal(scores.shape[-1], scores.device)  # (T, T)
        f = self.factor().view(1, -1, 1, 1)  # (1, H, 1, 1)
        linear = torch.einsum("bthf,bshf->bhts", phi_q, phi_k)  # (B, H, T, T)
        in_window = (diff >= 0) & (diff < self.window)
        return f * window_weights(scores, in_window) + (1 - f) * linear * (diff >= self.window)


def build_mixer(recipe, *, num_heads: int, scale: float) -> Mixer:
    """The mixer `recipe.mixer` for one layer, with the recipe's window, chunk size, eps and `mixer_options`."""
    cls = MIXERS.get(recipe.mixer)
    options: dict[str, Any] = dict(recipe.mixer_options)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "num_heads", "scale", "window",
                                                                   "chunk_size", "eps"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise RecipeError(f"mixer '{recipe.mixer}' got unknown option(s) {', '.join(unknown)}; "
                          f"it accepts: {', '.join(sorted(accepted)) or 'no options'}")
    return cls(num_heads=num_heads, scale=scale, window=recipe.window, chunk_size=recipe.chunk_size,
               eps=recipe.eps, **options)


__all__ = ["MIXERS", "MODES", "LinearMixer", "Mixer", "WindowMixer", "build_mixer"]
