"""Llama family (Llama 2 / 3.x, Mistral, Qwen2, Qwen3, SmolLM): q/k/v/o projections, rotary positions (whatever
scaling HF's rotary embedding applies: llama3, yarn, longrope, ...; partial rotary dims), grouped-query attention,
Qwen3's per-head q/k RMS norms, sliding layers (Mistral's `sliding_window`, Qwen's `layer_types`).

`LlamaLinearAttention` is also the base of the other rotary families (Gemma 3, OLMo 2, Phi-3): they differ in which
modules they share (`shared`) and how they project (`project`)."""

from __future__ import annotations

from importlib import import_module

import torch
from torch import nn

from ..attention import LinearAttention
from ..recipe import Recipe
from .base import Adapter, HFClasses, base_model_type, linear_forward, register_adapter, windows_of


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, R] (HF's rotary embedding output, scaling included). As HF does, only the
    first R <= D dims rotate (partial rotary: Phi-3's `partial_rotary_factor`), and the result keeps x's dtype."""
    rot = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, R)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    out = x_rot * cos + rotate_half(x_rot) * sin  # (B, T, H, R)
    return (torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out).to(x.dtype)


class LlamaLinearAttention(LinearAttention):
    """Drop-in for `LlamaAttention` and its look-alikes: the same projection (and norm) modules, shared, not copied,
    under the same state-dict names, plus the feature map and mixer."""

    shared = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")  # the original's modules reused as they are

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> None:
        config = original.config
        head_dim = original.head_dim
        super().__init__(layer_idx=layer_idx, num_heads=config.num_attention_heads,
                         num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
                         scale=getattr(original, "scaling", head_dim ** -0.5), recipe=recipe)
        self.config = config
        for name in self.shared:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def project(self, hidden_states: torch.Tensor):
        """Queries [B, T, H, D], keys and values [B, T, Hkv, D] before positions (Qwen3, Gemma 3: per-head norms)."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def qkv(self, hidden_states: torch.Tensor, position_embeddings=None):
        """Queries [B, T, H, D] and keys, values [B, T, Hkv, D] with rotary positions applied."""
        q, k, v = self.project(hidden_states)
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


def hf_names(family: str, prefix: str, config: str | None = None) -> HFClasses:
    return HFClasses(config or f"{prefix}Config", f"{prefix}ForCausalLM", f"{prefix}Attention",
                     f"transformers.models.{family}.modeling_{family}")


@register_adapter
class LlamaAdapter(Adapter):
    families = {"llama": hf_names("llama", "Llama"), "mistral": hf_names("mistral", "Mistral"),
                "qwen2": hf_names("qwen2", "Qwen2"), "qwen3": hf_names("qwen3", "Qwen3")}
    attention_attr = "self_attn"
    lora_targets = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    linear_class = LlamaLinearAttention
    every_layer_slides = ("mistral",)  # families whose `sliding_window`, once set, applies to every layer

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def layer_windows(self, config) -> list[int | None]:
        """Qwen-style `layer_types` name the sliding layers; Mistral slides every layer with a `sliding_window`."""
        return windows_of(config, every_layer=base_model_type(config) in self.every_layer_slides)

    def state_forward(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      cache) -> torch.Tensor:
        inner = model.model
        hidden = inner.embed_tokens(input_ids)  # (B, T, hidden)
        positions = inner.rotary_emb(hidden, position_ids=position_ids)
        for layer in inner.layers:
            hidden = layer(hidden, attention_mask=None, position_embeddings=positions, position_ids=position_ids,
                           cache=cache, use_cache=True)
        return model.lm_head(inner.norm(hidden))  # (B, T, V)

    def linear_attention(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> nn.Module:
        return self.linear_class(original, layer_idx, recipe)

    def softmax_attention(self, linear: nn.Module, config) -> nn.Module:
        classes = self.families[base_model_type(config)]
        attention_cls = getattr(import_module(classes.module), classes.attention)
        with torch.device("meta"):  # its own projections are placeholders, replaced by the shared ones below
            module = attention_cls(config, linear.layer_idx)
        for name in linear.shared:
            if hasattr(linear, name):
                setattr(module, name, getattr(linear, name))
        return module
