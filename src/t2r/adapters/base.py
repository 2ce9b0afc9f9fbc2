"""What every adapter provides, the adapter registry, and the helpers shared by all families.

An adapter declares everything t2r needs to know about one model family, and nothing outside this folder knows it:
its HF model types and classes, where the attention modules are and how to replace one (and put softmax back), which
layers attend over a sliding window, the softmax attention that attention transfer imitates, the modules LoRA adapts,
and how a KV cache is extended for the speed benchmark. A new family is one file here (plus its tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import LinearAttention, repeat_heads
from ..errors import ModelSourceError, UnsupportedModelError
from ..families import base_model_type, check_model_type, model_type_of_gguf  # noqa: F401  (re-exported)
from ..recipe import Recipe
from ..registry import Registry
from .cache import extend_kv_cache, recurrent_slot


class HFClasses(NamedTuple):
    """The names of a family's classes in `transformers`."""

    config: str  # e.g. "LlamaConfig"
    causal_lm: str  # e.g. "LlamaForCausalLM"
    attention: str  # e.g. "LlamaAttention"
    module: str  # the modeling module, e.g. "transformers.models.llama.modeling_llama"
    auto: str = "AutoModelForCausalLM"  # the Auto factory that loads it (encoder-decoders: AutoModelForSeq2SeqLM)


class Adapter:
    """Knows one model family's internals. Subclasses set `families` (HF `config.model_type` -> its classes),
    `attention_attr` (the attribute of a decoder layer that holds its attention), `lora_targets` (a regular
    expression over module names) and implement `decoder_layers`, `linear_attention` and `softmax_attention`."""

    name: str = ""
    families: dict[str, HFClasses] = {}
    gguf_architectures: dict[str, str] = {}  # a GGUF file's `general.architecture` -> model type, where they differ
    attention_attr: str = "self_attn"
    lora_targets: str = ""
    lora_fan_in_fan_out: bool = False  # peft's flag for Conv1D projections (GPT-2)

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def linear_attention(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> nn.Module:
        raise NotImplementedError

    def softmax_attention(self, linear: nn.Module, config) -> nn.Module:
        """The family's own softmax attention module rebuilt around `linear`'s (shared) projections."""
        raise NotImplementedError

    def state_forward(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      cache) -> torch.Tensor:
        """Logits [B, T, V] of `input_ids` [B, T] at `position_ids` [B, T], continuing (and advancing) the recurrent
        states held in `cache.layers`: the model's layers called directly, without the model-level forward's mask
        and cache bookkeeping. `t2r.step` compiles and exports it. Families without one raise."""
        raise UnsupportedModelError(f"the {type(self).__name__} family has no explicit-state decode step "
                                    "(llama, mistral, qwen2 and qwen3 have one)")

    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError for variants of the family this adapter cannot convert."""

    def layer_windows(self, config) -> list[int | None]:
        """Per decoder layer, the sliding window of its softmax attention (keys t - W < j <= t), or None for full
        causal attention. The default: every layer full."""
        return [None] * config.num_hidden_layers

    def softmax_reference(self, attn: LinearAttention, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> torch.Tensor:
        """The layer's own softmax attention on q [B, T, H, D], k, v [B, T, Hkv, D] (positions applied), before the
        output projection: the target of attention transfer. Sliding-window layers attend over their window."""
        groups = q.shape[2] // k.shape[2]
        k, v = repeat_heads(k, groups), repeat_heads(v, groups)  # (B, T, H, D)
        window = self.layer_windows(attn.config)[attn.layer_idx]
        mask = None if window is None else reference_mask(q.shape[1], window, q.device)  # (T, T)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None, scale=attn.scale)  # (B, H, T, D)
        return o.transpose(1, 2)  # (B, T, H, D)

    def visible_keys(self, attn: LinearAttention, length: int, device=None) -> torch.Tensor:
        """[T, T] bool: the keys each query of the layer's softmax attention sees (causal, within its window)."""
        return reference_mask(length, self.layer_windows(attn.config)[attn.layer_idx], device)

    def max_positions(self, config) -> int | None:
        """The longest sequence the family can place at all (learned absolute positions), or None (rotary positions
        extrapolate, however well)."""
        return None

    def swap(self, model: nn.Module, recipe: Recipe) -> None:
        """Swap the attention of every decoder layer not in `recipe.keep_softmax_layers` (see `swap_attention`).
        Encoder-decoder adapters also swap cross-attention (and optionally the encoder's)."""
        layers = self.decoder_layers(model)
        recipe.check_layers(len(layers))
        for i, layer in enumerate(layers):
            if i in recipe.keep_softmax_layers:
                continue
            original = getattr(layer, self.attention_attr)
            setattr(layer, self.attention_attr, self.linear_attention(original, i, recipe))

    def restore(self, model: nn.Module, layers) -> list[int]:
        """Softmax attention back in decoder `layers` (see `restore_softmax`); returns the layers that changed."""
        changed = []
        for i, layer in enumerate(self.decoder_layers(model)):
            module = getattr(layer, self.attention_attr)
            if i in layers and isinstance(module, LinearAttention):
                setattr(layer, self.attention_attr, self.softmax_attention(module, model.config))
                changed.append(i)
        return changed

    def extend_cache(self, cache, length: int):
        """A copy of a batch-1 `cache` made to hold `length` tokens (see `t2r.adapters.cache.extend_kv_cache`)."""
        return extend_kv_cache(cache, length)


def windows_of(config, every_layer: bool = False) -> list[int | None]:
    """Per layer, the window of its own softmax attention as HF builds its masks: `config.layer_types` names the
    sliding layers ("sliding_attention", over `config.sliding_window` tokens); without them a family whose layers all
    slide once `sliding_window` is set (Mistral, Phi-3: `every_layer`) slides every layer; otherwise none slides."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window if every_layer and window else None] * n


def reference_mask(length: int, window: int | None, device=None) -> torch.Tensor:
    """[T, T] bool: query t sees key j iff j <= t (and t - j < window when a window is given)."""
    diff = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]  # (T, T)
    return (diff >= 0) if window is None else (diff >= 0) & (diff < window)


ADAPTERS = Registry("model family", UnsupportedModelError)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register an adapter under each of its model types (the first is its name)."""
    ADAPTERS.register(*cls.families)(cls)
    return cls


def supported_model_types() -> list[str]:
    return ADAPTERS.names()


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s family (checked against the model); unknown families are refused, never guessed."""
    model_type = check_model_type(base_model_type(getattr(model, "config", None)), type(model).__name__)
    adapter = ADAPTERS.get(model_type)()
    adapter.check(model)
    return adapter


def swap_attention(model: nn.Module, recipe: Recipe, adapter: Adapter | None = None) -> nn.Module:
    """Replace the attention of every layer not in `recipe.keep_softmax_layers` by a linear attention module that
    reuses its projections (the adapter's `swap`). Every other weight is left untouched (same tensors)."""
    adapter = adapter or adapter_for(model)
    adapter.swap(model, recipe)
    return model


def restore_softmax(model: nn.Module, layers, adapter: Adapter | None = None) -> list[int]:
    """Put softmax attention back in `layers` (their linear modules' projections are reused; the feature maps are
    dropped). Returns the layers that changed. The caller records the new recipe."""
    adapter = adapter or adapter_for(model)
    return adapter.restore(model, layers)


def key_mask_from(attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor | None:
    """Which of the last `num_new` keys are real tokens, from the mask HF hands to attention modules.

    HF passes None (no padding), a 2-D [B, S] mask, or a 4-D [B, 1, Tq, Tk] mask that is boolean (True = attend)
    or additive (0 = attend). A key is real iff its own query attends to it: the diagonal of the last block."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        mask = attention_mask[:, -num_new:]
        return mask.bool() if mask.dtype != torch.bool else mask
    block = attention_mask[:, 0, -num_new:, -num_new:]  # (B, T, T)
    diag = torch.diagonal(block, dim1=-2, dim2=-1)  # (B, T)
    if diag.dtype == torch.bool:
        valid = diag
    else:
        valid = diag > torch.finfo(diag.dtype).min / 2
    return None if bool(valid.all()) else valid


def linear_forward(module, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache, kwargs: dict):
    """The body every adapter's attention forward shares: projections, state slot, attention, output projection.
    `kwargs` may carry `t2r_mode` ("chunk" | "recurrent" | "quadratic") threaded through the model's forward."""

    q, k, v = module.qkv(hidden_states, position_embeddings)
    slot = recurrent_slot(cache if cache is not None else kwargs.get("past_key_values"), module.layer_idx)
    o = module.attend(q, k, v, key_mask=key_mask_from(attention_mask, q.shape[1]), slot=slot,
                      mode=kwargs.get("t2r_mode"))
    return module.output(o), None



def drop_dequantized_quantizer(model: nn.Module) -> nn.Module:
    """A GGUF checkpoint loads through HF's GGUF quantizer; once its weights are dequantized into ordinary float
    tensors the quantizer only blocks `save_pretrained`, so detach it. Raise if weights are still packed."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelSourceError(
            f"the GGUF weights stayed packed ({packed[0]}, ...): load them dequantized, "
            "e.g. uninstall the `kernels` package so transformers dequantizes GGUF on load")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
