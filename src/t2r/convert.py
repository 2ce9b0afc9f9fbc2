"""Swap softmax attention for linear attention in a loaded HF model, via its family's adapter."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn

from .adapters import adapter_for, is_converted, mark_converted, restore_softmax, swap_attention
from .attention import LinearAttention
from .errors import RecipeError, T2RError
from .recipe import Recipe
from .rng import seeded

log = logging.getLogger(__name__)


def convert(model: nn.Module, recipe: Recipe | None = None, *, seed: int | None = 0, **fields) -> nn.Module:
    """Convert `model` in place and return it: still the same HF model (a subclass of its class), every attention
    not listed in `keep_softmax_layers` replaced by linear attention that reuses the pretrained q/k/v/o projections.
    The recipe is recorded in `model.config.t2r`, so `save_pretrained` / `t2r.load` rebuild it.

    Give a `Recipe`, or its fields as keywords (`feature_map="hedgehog", feature_dim=64, mixer="window", window=64,
    keep_softmax_layers=(0, 15)`, ...; see `t2r.recipe.Recipe`), not both. `seed` makes the new feature-map and mixer
    weights reproducible (None: use the global RNG as it is)."""
    if is_converted(model):
        raise T2RError("this model is already converted (its config has a t2r recipe)")
    if recipe is not None and fields:
        raise RecipeError(f"give a Recipe or recipe fields, not both (got recipe and {', '.join(sorted(fields))})")
    recipe = recipe or Recipe.from_dict({k: v for k, v in fields.items() if v is not None})  # None: the default
    adapter = adapter_for(model)
    param = next(model.parameters())
    with seeded(seed) if seed is not None else nullcontext():
        swap_attention(model, recipe, adapter)
    # new modules are float32 on CPU; follow the model's device (feature maps stay float32 by design)
    model.to(param.device)
    if recipe.feature_dim is None:  # record the map's own default, so the saved recipe is explicit
        first = next(m for m in model.modules() if isinstance(m, LinearAttention))
        recipe = replace(recipe, feature_dim=first.feature_map.feature_dim)
    mark_converted(model, recipe)
    log.info("converted %d attention layers (%s)", count_linear_layers(model), recipe.feature_map)
    return model


def reinitialize(model: nn.Module, seed: int = 0, std: float | None = None) -> nn.Module:
    """Throw the pretrained weights away (in place; returns `model`): every matrix and embedding is drawn from
    N(0, std) (default: the config's `initializer_range`, else 0.02), biases become 0 and normalisation scales 1.
    Call it before `convert` to build the same RNN from random initialisation (the T2R paper's baseline that
    measures what the pretrained weights are worth); tied weights stay tied."""
    if is_converted(model):
        raise T2RError("reinitialize the model before converting it (feature maps keep their own initialisation)")
    std = std if std is not None else float(getattr(model.config, "initializer_range", None) or 0.02)
    with seeded(seed), torch.no_grad():
        for name, param in model.named_parameters():  # yields a tied tensor once
            if param.dim() >= 2:
                param.normal_(0.0, std)
            elif name.endswith("bias"):
                param.zero_()
            else:  # RMSNorm / LayerNorm scales
                param.fill_(1.0)
    return model


def count_linear_layers(model: nn.Module) -> int:
    return sum(isinstance(m, LinearAttention) for m in model.modules())


def keep_softmax(model: nn.Module, layers: Iterable[int]) -> list[int]:
    """Give `layers` of a converted model their softmax attention back (same projections), and record them in the
    recipe so a saved model rebuilds the same way. Returns the layers that changed."""
    if not is_converted(model):
        raise T2RError("keep_softmax needs a converted model")
    recipe = Recipe.from_dict(model.config.t2r)
    layers = sorted(set(int(i) for i in layers))
    replace(recipe, keep_softmax_layers=tuple(layers)).check_layers(len(adapter_for(model).decoder_layers(model)))
    changed = restore_softmax(model, layers)
    kept = tuple(sorted(set(recipe.keep_softmax_layers) | set(layers)))
    model.config.t2r = replace(recipe, keep_softmax_layers=kept).to_dict()
    return changed
