"""GPT-2: fused c_attn projection (Conv1D), absolute learned positions (added to the embeddings, so nothing to do
here), multi-head attention without GQA."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import LinearAttention
from ..errors import UnsupportedModelError
from ..recipe import Recipe
from .base import Adapter, key_mask_from, linear_kwargs, register_adapter
from .cache import recurrent_slot


class GPT2LinearAttention(LinearAttention):
    """Drop-in for `GPT2Attention` (self-attention only): keeps `c_attn`, `c_proj` and `resid_dropout`."""

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> None:
        super().__init__(layer_idx=layer_idx, num_heads=original.num_heads, num_kv_heads=original.num_heads,
                         head_dim=original.head_dim, scale=original.scaling, recipe=recipe)
        self.config = original.config
        self.split_size = original.split_size
        self.c_attn, self.c_proj, self.resid_dropout = original.c_attn, original.c_proj, original.resid_dropout

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, encoder_hidden_states=None,
                **kwargs):
        if encoder_hidden_states is not None:
            raise UnsupportedModelError("GPT-2 cross-attention is not converted by t2r")
        B, T, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        q, k, v = (x.view(B, T, self.num_heads, self.head_dim) for x in (q, k, v))  # (B, T, H, D)
        slot = recurrent_slot(cache if cache is not None else kwargs.get("past_key_values"), self.layer_idx)
        o = self.attend(q, k, v, key_mask=key_mask_from(attention_mask, T), slot=slot, **linear_kwargs(kwargs))
        return self.resid_dropout(self.c_proj(o.reshape(B, T, -1))), None


@register_adapter
class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2",)
    attention_attr = "attn"

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.h)

    def check(self, model: nn.Module) -> None:
        if getattr(model.config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not supported")

    def linear_attention(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> nn.Module:
        return GPT2LinearAttention(original, layer_idx, recipe)
