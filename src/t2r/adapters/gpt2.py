"""GPT-2: fused c_attn projection (Conv1D), absolute learned positions (added to the embeddings, so nothing to do
here), multi-head attention without GQA."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from ..attention import LinearAttention
from ..errors import UnsupportedModelError
from ..recipe import Recipe
from .base import Adapter, HFClasses, linear_forward, register_adapter


class GPT2LinearAttention(LinearAttention):
    """Drop-in for `GPT2Attention` (self-attention only): keeps `c_attn`, `c_proj` and `resid_dropout`."""

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> None:
        super().__init__(layer_idx=layer_idx, num_heads=original.num_heads, num_kv_heads=original.num_heads,
                         head_dim=original.head_dim, scale=original.scaling, recipe=recipe)
        self.config = original.config
        self.split_size = original.split_size
        self.c_attn, self.c_proj, self.resid_dropout = original.c_attn, original.c_proj, original.resid_dropout

    def qkv(self, hidden_states: torch.Tensor, position_embeddings=None):
        """Queries, keys, values [B, T, H, D] (GPT-2's positions are already in the hidden states)."""
        B, T, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        return tuple(x.view(B, T, self.num_heads, self.head_dim) for x in (q, k, v))  # (B, T, H, D) each

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(o.flatten(2)))

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, encoder_hidden_states=None,
                **kwargs):
        if encoder_hidden_states is not None:
            raise UnsupportedModelError("GPT-2 cross-attention is not converted by t2r")
        return linear_forward(self, hidden_states, None, attention_mask, cache, kwargs)


@register_adapter
class GPT2Adapter(Adapter):
    families = {"gpt2": HFClasses("GPT2Config", "GPT2LMHeadModel", "GPT2Attention",
                                  "transformers.models.gpt2.modeling_gpt2")}
    attention_attr = "attn"
    lora_targets = r".*\.attn\.(c_attn|c_proj)"
    lora_fan_in_fan_out = True  # GPT-2's projections are Conv1D (weights stored transposed)

    def max_positions(self, config) -> int | None:
        return config.n_positions  # learned absolute position embeddings

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.h)

    def check(self, model: nn.Module) -> None:
        if getattr(model.config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not supported")

    def linear_attention(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> nn.Module:
        return GPT2LinearAttention(original, layer_idx, recipe)

    def softmax_attention(self, linear: nn.Module, config) -> nn.Module:
        with torch.device("meta"):  # placeholders, replaced by the shared modules below
            module = GPT2Attention(config, layer_idx=linear.layer_idx)
        module.c_attn, module.c_proj, module.resid_dropout = linear.c_attn, linear.c_proj, linear.resid_dropout
        module.attn_dropout = torch.nn.Dropout(config.attn_pdrop)
        return module
