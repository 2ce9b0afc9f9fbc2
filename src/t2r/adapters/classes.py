"""The converted model classes, registered with the `Auto*` factories so that, after `import t2r`,
`AutoModelForCausalLM.from_pretrained(dir)` rebuilds a saved converted model with no `trust_remote_code`.

Each class subclasses the family's own HF class (a converted Llama is still a `LlamaForCausalLM`); its config
subclass only changes `model_type` to "t2r_<family>" and carries the recipe in `config.t2r`.
"""

from __future__ import annotations

import copy

import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import UnsupportedModelError
from ..recipe import Recipe
from .base import adapter_for, base_model_type, swap_attention

# family model_type -> (config class name, causal LM class name) in transformers
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}
CONVERTED_CLASSES: dict[str, tuple[type, type]] = {}


def _make_classes(family: str) -> tuple[type, type]:
    config_name, model_name = FAMILIES[family]
    base_config, base_model = getattr(transformers, config_name), getattr(transformers, model_name)
    config_cls = type(f"T2R{config_name}", (base_config,), {"model_type": f"t2r_{family}", "__module__": __name__})

    def __init__(self, config):
        base_model.__init__(self, config)
        swap_attention(self, Recipe.from_dict(config.t2r))

    model_cls = type(f"T2R{model_name}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__, "__module__": __name__})
    return config_cls, model_cls


def register_all() -> None:
    for family in FAMILIES:
        if family in CONVERTED_CLASSES:
            continue
        config_cls, model_cls = _make_classes(family)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        CONVERTED_CLASSES[family] = (config_cls, model_cls)


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
    family = base_model_type(model.config)
    config_name, model_name = FAMILIES[family]
    config = getattr(transformers, config_name).from_dict(
        {k: v for k, v in model.config.to_dict().items() if k not in ("t2r", "model_type", "architectures")})
    config._attn_implementation = model.config._attn_implementation
    param = next(model.parameters())
    original = getattr(transformers, model_name)(config).to(device=param.device, dtype=param.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".feature_map." not in k and not k.endswith("window_logit")}
    missing, unexpected = original.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise UnsupportedModelError(f"weights do not map back onto {model_name}: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        original.tie_weights()
    return original.eval()
