"""The converted model classes, registered with the `Auto*` factories so that, after `import t2r`,
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds a saved converted model with no `trust_remote_code`.

Each class subclasses the family's own HF class (a converted Llama is still a `LlamaForCausalLM`); its config
subclass only changes `model_type` to "t2r_<family>" and carries the recipe in `config.t2r`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, GenerationConfig

from ..attention import is_conversion_parameter
from ..errors import UnsupportedModelError
from ..recipe import Recipe
from ..rng import seeded
from ..stages.delta import is_delta_dir, materialise
from .base import ADAPTERS, adapter_for, base_model_type, swap_attention

log = logging.getLogger(__name__)
CONVERTED_CLASSES: dict[str, tuple[type, type]] = {}
LEGACY_WINDOW_KEY = ".window_logit"  # recipe version 1 kept the window factors on the attention module itself


def hf_classes(family: str):
    """The family's (config class, causal LM class) in transformers (for an encoder-decoder: its seq2seq LM)."""
    classes = ADAPTERS.get(family).families[family]
    return getattr(transformers, classes.config), getattr(transformers, classes.causal_lm)


def auto_class(model_type: str):
    """The `Auto*` factory that loads a model of `model_type` (converted "t2r_<family>" or not): AutoModelForCausalLM,
    or AutoModelForSeq2SeqLM for an encoder-decoder family."""
    family = model_type[len("t2r_"):] if model_type.startswith("t2r_") else model_type
    adapter = ADAPTERS.get(family) if family in ADAPTERS else None
    return getattr(transformers, adapter.families[family].auto if adapter else "AutoModelForCausalLM")


def make_classes(family: str, module: str = __name__) -> tuple[type, type]:
    """The family's converted (config class, model class), defined as if in `module` (the entry file of a model's
    remote code, `t2r.remote_code`, names its own module: transformers copies that file when it saves the model)."""
    base_config, base_model = hf_classes(family)
    config_cls = type(f"T2R{base_config.__name__}", (base_config,),
                      {"model_type": f"t2r_{family}", "__module__": module})

    def __init__(self, config):
        base_model.__init__(self, config)
        recipe = Recipe.from_dict(config.t2r)
        config.t2r = recipe.to_dict()  # an older recipe version is upgraded (it means what it meant)
        swap_attention(self, recipe)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        kwargs.setdefault("use_safetensors", True)  # a converted model is never read from a pickle, by any path
        if path is not None and is_delta_dir(path):  # a pipeline stage saved as its changes: rebuilt from the chain
            return _from_delta(super(model_cls, cls).from_pretrained, config_cls, path, *args, **kwargs)
        loaded = super(model_cls, cls).from_pretrained(path, *args, **kwargs)
        model, info = loaded if isinstance(loaded, tuple) else (loaded, None)  # output_loading_info=True: a pair
        if getattr(cls, "_auto_class", None) is None and hasattr(model.config, "auto_map"):
            del model.config.auto_map  # t2r's own class read a directory saved with its code: saved again (HF's
            # save_pretrained, push_to_hub) it would claim code it does not write (t2r.remote_code writes it)
        if load_legacy_window_factors(model, path):
            log.info("%s was saved before mixers (recipe version 1): its window factors were moved into the mixers "
                     "(the load report's window_logit lines are expected)", path)
            if info is not None:  # found after all
                moved = ".mixer" + LEGACY_WINDOW_KEY
                info["missing_keys"] = type(info["missing_keys"])(k for k in info["missing_keys"]
                                                                  if not k.endswith(moved))
        return loaded

    model_cls = type(f"T2R{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__, "from_pretrained": from_pretrained,
                      "__module__": module})
    return config_cls, model_cls


def _from_delta(from_pretrained, config_cls, path, *args, **kwargs):
    """`from_pretrained` of the stage delta at `path` (`t2r.stages.delta`): its parents' tensors with its changes over
    them, as the state dict of a model built from its own config.json (and generation config)."""
    kwargs.setdefault("config", config_cls.from_pretrained(str(path)))
    loaded = from_pretrained(None, *args, state_dict=materialise(path), **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.config.name_or_path = str(path)
    return loaded


def load_legacy_window_factors(model: nn.Module, path) -> int:
    """Models saved before mixers were modules (recipe version 1) hold each layer's window factors at
    `...self_attn.window_logit`; they now live in the mixer (`...self_attn.mixer.window_logit`), so HF's loader
    leaves them out. Copy them from the checkpoint in the local directory `path` into place; returns how many."""
    files = sorted(Path(path).glob("*.safetensors")) if path is not None and Path(path).is_dir() else []
    params = dict(model.named_parameters())
    copied = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                new = key[: -len(LEGACY_WINDOW_KEY)] + ".mixer" + LEGACY_WINDOW_KEY
                if key.endswith(LEGACY_WINDOW_KEY) and ".mixer." not in key and new in params:
                    with torch.no_grad():
                        params[new].copy_(f.get_tensor(key))
                    copied += 1
    return copied


def register_all() -> None:
    for family in supported_families():
        if family in CONVERTED_CLASSES:
            continue
        config_cls, model_cls = make_classes(family)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        auto_class(family).register(config_cls, model_cls, exist_ok=True)
        CONVERTED_CLASSES[family] = (config_cls, model_cls)


def supported_families() -> list[str]:
    return [family for adapter in ADAPTERS.values() for family in adapter.families]


def mark_converted(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Record the recipe and turn `model` (and its config) into the registered converted classes, in place."""
    adapter_for(model)  # raises for unsupported families
    family = base_model_type(model.config)
    if family not in CONVERTED_CLASSES:
        raise UnsupportedModelError(f"no converted class for {family!r}; known: {', '.join(CONVERTED_CLASSES)}")
    config_cls, model_cls = CONVERTED_CLASSES[family]
    old = model.config
    config = copy.deepcopy(old)  # the caller's config object may be shared with other models: leave it as it was
    config.__class__ = config_cls
    config.t2r = recipe.to_dict()
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = model_cls
    return model


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "config", None), "t2r", None), dict)


def original_model(model: nn.Module) -> nn.Module:
    """A new softmax model with the converted model's pretrained weights (same projections, embeddings, MLPs, dtype,
    device): the conversion's starting point, rebuilt without its source. Feature maps are left out."""
    if not is_converted(model):
        raise UnsupportedModelError("original_model needs a converted model")
    config_cls, model_cls = hf_classes(base_model_type(model.config))
    config = config_cls.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k not in ("t2r", "model_type", "architectures")})
    config._attn_implementation = model.config._attn_implementation
    param = next(model.parameters())
    with seeded(None):  # its random initial weights are overwritten: leave the caller's RNG as it was
        original = model_cls(config).to(device=param.device, dtype=param.dtype)
    state = {k: v for k, v in model.state_dict().items() if not is_conversion_parameter(k)}
    missing, unexpected = original.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise UnsupportedModelError(f"weights do not map back onto {model_cls.__name__}: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        original.tie_weights()
    return original.eval()
