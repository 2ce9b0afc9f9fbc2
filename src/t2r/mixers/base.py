"""The mixer base class, its registry and the builder; the small per-head projections that gated mixers compute their
gates with."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from ..errors import RecipeError, T2RError
from ..registry import Registry

MIXERS = Registry("mixer", RecipeError)
WINDOW_ONLY_LOGIT = 1e4  # sigmoid(1e4) == 1.0 exactly in float32: the recurrent part gets weight 0


class Mixer(nn.Module):
    """Base class. `window` and `chunk_size`, `eps` come from the recipe; `scale` is the pretrained softmax scale.

    `normalised`: True when `weights` rows, divided by their sums, are the mixer's attention (linear attention with a
    normaliser); False when the output is `weights @ v` itself (the delta rule, whose weights can be negative)."""

    name: str = ""
    normalised: bool = True

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

    def weights(self, scores: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor, *,
                v: torch.Tensor | None = None) -> torch.Tensor:
        """The weight each query gives each key, [B, H, T, T], from the softmax scores [B, H, T, T] (scale q.k), the
        feature maps [B, T, H, F] and the values [B, T, H, D] (gated mixers compute their gates from them):
        `forward`'s output (zero state) is `weights / weights.sum(-1)` times v when `normalised`, else `weights @ v`."""
        raise NotImplementedError

    def without(self, part: str) -> "Mixer":
        """A mixer like this one with `part` switched off (an evaluation-time ablation, `t2r.ablation`); the same
        parameters are shared, not copied. Raises T2RError when the mixer has no such part."""
        raise T2RError(f"the {self.name} mixer has no {part} part to switch off")

    def _options(self) -> dict:
        return {"chunk_size": self.chunk_size, "eps": self.eps}

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window={self.window}"


def causal_offsets(T: int, device) -> torch.Tensor:
    """[T, T] query position - key position."""
    return torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]


def logit(p: float) -> float:
    """The pre-sigmoid value whose sigmoid is p (0 < p < 1)."""
    return math.log(p / (1 - p))


def check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RecipeError(f"mixer option {name} must be a number strictly between 0 and 1, got {value!r}")


class HeadProjection(nn.Module):
    """Per head, an affine map of the value vector [B, T, H, D] -> [B, T, H, out] (`out` = 0: [B, T, H]), float32.

    The weights start at zero, so right after the swap it is its bias, `init` everywhere: a gate starts constant and
    learns to depend on the token. The values are the pretrained value projection of the layer input (no positions),
    so the gate reads what the token says, not where it stands."""

    def __init__(self, num_heads: int, head_dim: int, out: int, init: float) -> None:
        super().__init__()
        self.out = out
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim, max(out, 1)))
        self.bias = nn.Parameter(torch.full((num_heads, max(out, 1)), float(init)))
        self.head_dim = head_dim

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(v.dtype, torch.float32)  # float32, or float64 for a float64 model
        y = torch.einsum("bthd,hdo->btho", v.to(dtype), self.weight.to(dtype)) + self.bias.to(dtype)  # (B,T,H,out)
        return y if self.out else y.squeeze(-1)

    def extra_repr(self) -> str:
        return f"heads={self.weight.shape[0]}, in={self.head_dim}, out={self.out or 'scalar'}"


def build_mixer(recipe, *, num_heads: int, scale: float, head_dim: int | None = None,
                feature_dim: int | None = None) -> Mixer:
    """The mixer `recipe.mixer` for one layer, with the recipe's window, chunk size, eps and `mixer_options`; the
    layer's `head_dim` and the feature map's output size `feature_dim` go to mixers that take them (gated ones)."""
    cls = MIXERS.get(recipe.mixer)
    options: dict[str, Any] = dict(recipe.mixer_options)
    taken = set(inspect.signature(cls.__init__).parameters)
    geometry = {"head_dim": head_dim, "feature_dim": feature_dim}
    accepted = taken - {"self", "num_heads", "scale", "window", "chunk_size", "eps", *geometry}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise RecipeError(f"mixer '{recipe.mixer}' got unknown option(s) {', '.join(unknown)}; "
                          f"it accepts: {', '.join(sorted(accepted)) or 'no options'}")
    for name, value in geometry.items():
        if name in taken:
            if value is None:
                raise RecipeError(f"mixer '{recipe.mixer}' needs the layer's {name.replace('_', ' ')}")
            options[name] = value
    return cls(num_heads=num_heads, scale=scale, window=recipe.window, chunk_size=recipe.chunk_size,
               eps=recipe.eps, **options)
