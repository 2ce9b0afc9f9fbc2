"""Phi-3: one fused `qkv_proj` (queries, then keys, then values) and a fused gate-up MLP (outside attention:
untouched); rotary positions with HF's LongRoPE ("su") scaling and partial rotary dims applied by HF's rotary embedding
(its cos/sin are used as they come); a `sliding_window`, when set, applies to every layer (Phi-3-mini: 2047).

LongRoPE picks its short or long factors per forward call from the longest position in that call; so does HF's own
KV-cached decoding, and the recurrent state keeps keys rotated as they were when read, exactly like a KV cache."""

from __future__ import annotations

import torch

from .base import register_adapter
from .llama import LlamaAdapter, LlamaLinearAttention, hf_names


class Phi3LinearAttention(LlamaLinearAttention):
    """`Phi3Attention`'s fused `qkv_proj` and `o_proj`, reused."""

    shared = ("qkv_proj", "o_proj")

    def project(self, hidden_states: torch.Tensor):
        B, T, _ = hidden_states.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden_states).split((q_size, kv_size, kv_size), dim=-1)
        return (q.view(B, T, -1, self.head_dim), k.view(B, T, -1, self.head_dim),  # (B, T, H, D), (B, T, Hkv, D)
                v.view(B, T, -1, self.head_dim))  # (B, T, Hkv, D)


@register_adapter
class Phi3Adapter(LlamaAdapter):
    families = {"phi3": hf_names("phi3", "Phi3")}
    lora_targets = r".*\.self_attn\.(qkv_proj|o_proj)"
    linear_class = Phi3LinearAttention
    every_layer_slides = ("phi3",)
