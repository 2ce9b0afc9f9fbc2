"""The linear attention layer, independent of any model family: a feature map (`t2r.feature_maps`) plus a mixer
(`t2r.mixers`), both built from the recipe.

`LinearAttention` owns what the conversion adds (the feature map and the mixer with its parameters) and runs the
attention computation. An adapter subclass (see `t2r.adapters`) reuses the pretrained q/k/v/o projections of the
module it replaces, applies the model's own positions, and calls `attend`.
"""

from __future__ import annotations

import torch
from torch import nn

from .feature_maps import build_feature_map
from .mixers import build_mixer
from .ops import MODES
from .recipe import Recipe

CONVERSION_PARAMETERS = (".feature_map.", ".mixer.")  # what a conversion adds to a model, by parameter name


def is_conversion_parameter(name: str) -> bool:
    """True for the parameters the conversion added (feature maps, mixer parameters such as window factors or gates):
    what attention transfer trains, and what the original model does not have."""
    return any(part in f".{name}" for part in CONVERSION_PARAMETERS)


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hkv * groups, D]: each key/value head serves `groups` query heads (GQA)."""
    if groups == 1:
        return x
    B, T, H, D = x.shape
    return x[:, :, :, None, :].expand(B, T, H, groups, D).reshape(B, T, H * groups, D)


class LinearAttention(nn.Module):
    """Base class of every converted attention module.

    Args:
        layer_idx: index of the decoder layer (the cache slot).
        num_heads / num_kv_heads / head_dim: the pretrained attention's geometry.
        scale: the pretrained softmax scale (used by the sliding window part).
        recipe: what to build.
    """

    def __init__(self, *, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 recipe: Recipe) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.recipe = recipe
        options = dict(recipe.feature_map_options)
        if recipe.tie_qk is not None:
            options["tie_qk"] = recipe.tie_qk
        self.feature_map = build_feature_map(recipe.feature_map, num_heads, head_dim, recipe.feature_dim, **options)
        self.mixer = build_mixer(recipe, num_heads=num_heads, scale=scale, head_dim=head_dim,
                                 feature_dim=self.feature_map.out_dim)

    def qkv(self, hidden_states: torch.Tensor, position_embeddings=None):
        """The pretrained projections with the model's positions: q [B, T, H, D], k, v [B, T, Hkv, D]."""
        raise NotImplementedError  # adapters implement it

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] -> [B, T, hidden] through the pretrained output projection."""
        raise NotImplementedError  # adapters implement it

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None = None,
               slot=None, mode: str | None = None) -> torch.Tensor:
        """q: [B, T, H, D]; k, v: [B, T, Hkv, D] (positions applied); key_mask: [B, T] bool or None;
        slot: a `RecurrentLayer` to read and advance, or None (no cache); mode: None picks "recurrent" for one
        token with a state and "chunk" otherwise. Returns o: [B, T, H, D] in v.dtype."""
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_heads(k, groups), repeat_heads(v, groups)  # (B, T, H, D)
        phi_q, phi_k = self.feature_map(q, k)  # (B, T, H, F) float32
        state = None if slot is None else slot.state
        mode = mode or ("recurrent" if q.shape[1] == 1 and state is not None else "chunk")
        if mode not in MODES:
            raise ValueError(f"unknown linear attention mode {mode!r}; known: {', '.join(MODES)}")
        o, new_state = self.mixer(q, k, v, phi_q, phi_k, key_mask=key_mask, state=state, mode=mode,
                                  output_final_state=slot is not None)
        if slot is not None:
            slot.advance(new_state, q.shape[1])
        return o.to(v.dtype)  # (B, T, H, D)

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
                f"feature_map={r.feature_map}, mixer={r.mixer}, window={r.window}")
