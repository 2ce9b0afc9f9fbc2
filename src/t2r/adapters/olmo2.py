"""OLMo 2: RMS norms on the whole query and key projections (not per head: before the split into heads), then
rotary positions; the norms after attention and after the MLP are the decoder layer's, outside attention."""

from __future__ import annotations

import torch

from .base import register_adapter
from .llama import LlamaAdapter, LlamaLinearAttention, hf_names


class Olmo2LinearAttention(LlamaLinearAttention):
    """`Olmo2Attention`'s projections and q/k norms, reused."""

    def project(self, hidden_states: torch.Tensor):
        B, T, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states)).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.k_norm(self.k_proj(hidden_states)).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        return q, k, v


@register_adapter
class Olmo2Adapter(LlamaAdapter):
    families = {"olmo2": hf_names("olmo2", "Olmo2")}
    linear_class = Olmo2LinearAttention
    every_layer_slides = ()
