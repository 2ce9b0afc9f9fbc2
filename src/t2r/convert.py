"""Swap softmax attention for linear attention in a loaded HF model, via its family's adapter."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn

from .adapters import adapter_for, is_converted, mark_converted, restore_softmax, swap_attention
from .attention import LinearAttention, is_conversion_parameter
from .budget import FLOAT_BYTES, require_memory
from .errors import RecipeError, T2RError
from .recipe import Recipe
from .rng import seeded

log = logging.getLogger(__name__)
CONVERT_LAYERS = ("all", "global")  # besides explicit layer indices


def convert(model: nn.Module, recipe: Recipe | None = None, *, seed: int | None = 0,
            convert_layers: str | Iterable[int] = "all", inplace: bool = True, encoder: str | None = None,
            **fields) -> nn.Module:
    """Convert `model` and return it: still the same HF model (a subclass of its class), every attention not listed
    in `keep_softmax_layers` replaced by linear attention that reuses the pretrained q/k/v/o projections. The recipe
    is recorded in `model.config.t2r`, so `save_pretrained` / `t2r.load` rebuild it.

    `inplace=True` (the default) changes `model` itself (its class, config and attention modules) and returns it: the
    original is gone (`t2r.adapters.original_model` rebuilds it from the converted weights). `inplace=False` converts
    a copy and leaves `model` as it was (twice the memory while both exist).

    Give a `Recipe`, or its fields as keywords (`feature_map="hedgehog", feature_dim=64, mixer="window", window=64,
    keep_softmax_layers=(0, 15)`, ...; see `t2r.recipe.Recipe`), not both. `convert_layers` picks the layers to
    convert: "all", "global" (those whose own attention does not slide: Gemma 3's global layers), or layer indices
    ("0,5" or a list); the others keep their softmax attention and are recorded in `keep_softmax_layers`. `seed`
    makes the new feature-map and mixer weights reproducible (None: use the global RNG as it is). `encoder`, for an
    encoder-decoder (Marian, BART): "softmax" (default, the paper's choice) or "linear" (non-causal linear attention
    in the encoder too; T5's encoder stays softmax); recorded in `config.t2r_encoder`."""
    if is_converted(model):
        raise T2RError("this model is already converted (its config has a t2r recipe)")
    if recipe is not None and fields:
        raise RecipeError(f"give a Recipe or recipe fields, not both (got recipe and {', '.join(sorted(fields))})")
    recipe = recipe or Recipe.from_dict({k: v for k, v in fields.items() if v is not None})  # None: the default
    if not inplace:
        model = copy.deepcopy(model)
    adapter = adapter_for(model)
    if encoder is not None:
        if not getattr(adapter, "is_encoder_decoder", False):
            raise T2RError(f"encoder={encoder!r} is for encoder-decoder models; {type(model).__name__} has no encoder")
        if encoder not in ("softmax", "linear"):
            raise T2RError(f"encoder is softmax or linear, got {encoder!r}")
        adapter.check_encoder(encoder)  # a family may refuse a linear encoder (T5: its positions are in the bias)
        model.config.t2r_encoder = encoder
    recipe = with_layers_to_convert(recipe, adapter.layer_windows(model.config), convert_layers)
    param = next(model.parameters())
    require_memory(added_bytes(model, recipe, adapter), "the conversion's new weights",
                   "choose a smaller --feature-dim (or convert fewer layers)", device=str(param.device))
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


def added_bytes(model: nn.Module, recipe: Recipe, adapter) -> int:
    """Bytes of the weights the conversion adds (feature maps, mixer parameters: float32), counted on one layer built
    on the meta device (no memory), times the layers converted."""
    layers = adapter.decoder_layers(model)
    converted = [i for i in range(len(layers)) if i not in recipe.keep_softmax_layers]
    if not converted:
        return 0
    with torch.device("meta"):
        probe = adapter.linear_attention(getattr(layers[converted[0]], adapter.attention_attr), converted[0], recipe)
    per_layer = sum(p.numel() for n, p in probe.named_parameters() if is_conversion_parameter(n))
    return per_layer * len(converted) * FLOAT_BYTES


def with_layers_to_convert(recipe: Recipe, windows: list[int | None], spec: str | Iterable[int]) -> Recipe:
    """`recipe` with the layers that `spec` leaves out ("all" | "global" | indices; `windows`: each layer's own
    sliding window or None) added to `keep_softmax_layers`. A choice other than "all" must leave a layer to
    convert."""
    n = len(windows)
    recipe.check_layers(n)
    if isinstance(spec, str) and spec == "all":
        return recipe
    if spec == "global":
        chosen = {i for i, w in enumerate(windows) if w is None}
    else:
        try:
            chosen = {int(i) for i in (spec.replace(" ", "").split(",") if isinstance(spec, str) else spec) if i != ""}
        except (TypeError, ValueError):
            raise RecipeError(f"convert_layers is all, global or layer indices like 0,5; got {spec!r}") from None
        if bad := sorted(i for i in chosen if not 0 <= i < n):
            raise RecipeError(f"convert_layers {bad} out of range: the model has layers 0..{n - 1}")
    kept = set(recipe.keep_softmax_layers) | (set(range(n)) - chosen)
    if len(kept) >= n:
        raise RecipeError(f"convert_layers={spec!r} leaves no layer to convert (kept softmax: all {n}; "
                          f"global layers: {[i for i, w in enumerate(windows) if w is None]})")
    return replace(recipe, keep_softmax_layers=tuple(sorted(kept)))


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
