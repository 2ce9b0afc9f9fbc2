"""Evaluation-time ablations: switch one part of a converted model off, without retraining, to see what carries it.

    with ablated(model, "linear"):          # window only: the recurrent part of every windowed mixer gets weight 0
        ...                                 # (each layer is then exactly sliding-window softmax attention)
    with ablated(model, "window"):          # recurrence only: every windowed mixer loses its softmax window
    with ablated(model, "gate"):            # no forgetting: every gated mixer's decays set to 1 (gla -> linear,
        ...                                 # gated_delta -> delta)
    with ablated(model, "softmax-layers"):  # the layers kept softmax become linear attention too (feature maps
        ...                                 # freshly initialised: nothing trained them)

The model is changed in place inside the block and restored when it ends, however it ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import T2RError

if TYPE_CHECKING:
    from torch import nn

PARTS = ("linear", "window", "gate", "softmax-layers")


@contextmanager
def ablated(model: nn.Module, part: str, *, seed: int = 0):
    """Inside the block, `model` runs with `part` switched off (see the module docstring)."""
    from .adapters import adapter_for  # here: PARTS is read by `t2r eval --help`, which does not import torch
    from .attention import LinearAttention

    if part not in PARTS:
        raise T2RError(f"unknown ablation {part!r}; choose one of: {', '.join(PARTS)}")
    adapter = adapter_for(model)
    attr = adapter.attention_attr
    undo = []  # (object, attribute, original value)
    try:
        for i, layer in enumerate(adapter.decoder_layers(model)):
            attn = getattr(layer, attr)
            if part == "softmax-layers" and not isinstance(attn, LinearAttention):
                undo.append((layer, attr, attn))
                setattr(layer, attr, _fresh_linear(adapter, attn, i, model, seed))
            elif part != "softmax-layers" and isinstance(attn, LinearAttention):
                undo.append((attn, "mixer", attn.mixer))
                attn.mixer = attn.mixer.without(part)
        if not undo:
            raise T2RError(f"nothing to switch off: this model has no {part.replace('-', ' ')}")
        yield model
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)


def _fresh_linear(adapter, softmax: nn.Module, layer_idx: int, model: nn.Module, seed: int) -> nn.Module:
    """A linear attention module around a softmax layer's projections, with the model's recipe and new feature maps."""
    from .recipe import Recipe
    from .rng import seeded

    recipe = Recipe.from_dict(model.config.t2r)
    param = next(model.parameters())
    with seeded(seed + layer_idx):
        module = adapter.linear_attention(softmax, layer_idx, recipe)
    return module.to(param.device)
