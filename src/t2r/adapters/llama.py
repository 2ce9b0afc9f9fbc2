"""Llama family (Llama, Mistral, Qwen2, SmolLM): q/k/v/o projections, rotary positions, grouped-query attention."""

from __future__ import annotations

from importlib import import_module

import torch
from torch import nn

from ..attention import LinearAttention
from ..errors import UnsupportedModelError
from ..recipe import Recipe
from .base import Adapter, HFClasses, base_model_type, linear_forward, register_adapter


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, D] (HF's rotary embedding output)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D)
    return x * cos + rotate_half(x) * sin


class LlamaLinearAttention(LinearAttention):
    """Drop-in for `LlamaAttention` and its look-alikes: same projection modules (shared, not copied), same
    state-dict names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, optional `q_norm`/`k_norm`), plus the feature map."""

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> None:
        config = original.config
        head_dim = original.head_dim
        super().__init__(layer_idx=layer_idx, num_heads=config.num_attention_heads,
                         num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
                         scale=getattr(original, "scaling", head_dim ** -0.5), recipe=recipe)
        self.config = config
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            original.q_proj, original.k_proj, original.v_proj, original.o_proj)
        for norm in ("q_norm", "k_norm"):  # Qwen3-style per-head norms, applied before the rotation
            if hasattr(original, norm):
                setattr(self, norm, getattr(original, norm))

    def qkv(self, hidden_states: torch.Tensor, position_embeddings=None):
        """Queries [B, T, H, D] and keys, values [B, T, Hkv, D] with rotary positions applied."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] attention output -> [B, T, hidden] through the pretrained output projection."""
        return self.o_proj(o.flatten(2))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        return linear_forward(self, hidden_states, position_embeddings, attention_mask, cache, kwargs)


def _classes(family: str, prefix: str) -> HFClasses:
    return HFClasses(f"{prefix}Config", f"{prefix}ForCausalLM", f"{prefix}Attention",
                     f"transformers.models.{family}.modeling_{family}")


@register_adapter
class LlamaAdapter(Adapter):
    families = {"llama": _classes("llama", "Llama"), "mistral": _classes("mistral", "Mistral"),
                "qwen2": _classes("qwen2", "Qwen2")}
    attention_attr = "self_attn"
    lora_targets = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def check(self, model: nn.Module) -> None:
        config = model.config
        if getattr(config, "use_sliding_window", False) or getattr(config, "layer_types", None) and any(
                t != "full_attention" for t in config.layer_types):
            raise UnsupportedModelError(
                "models whose own attention uses sliding windows per layer are not supported yet; "
                "convert a full-attention variant")

    def layer_windows(self, config) -> list[int | None]:
        """Qwen2-style `layer_types` name the sliding layers; Mistral slides every layer with a `sliding_window`."""
        n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types:
            return [window if t == "sliding_attention" else None for t in types]
        return [window if base_model_type(config) == "mistral" and window else None] * n

    def linear_attention(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> nn.Module:
        return LlamaLinearAttention(original, layer_idx, recipe)

    def softmax_attention(self, linear: nn.Module, config) -> nn.Module:
        classes = self.families[base_model_type(config)]
        attention_cls = getattr(import_module(classes.module), classes.attention)
        with torch.device("meta"):  # its own projections are placeholders, replaced by the shared ones below
            module = attention_cls(config, linear.layer_idx)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if hasattr(linear, name):
                setattr(module, name, getattr(linear, name))
        return module
