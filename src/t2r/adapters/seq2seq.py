"""Encoder-decoder translation models (Marian, BART): the T2R paper's machine-translation half.

A translation model has three attentions per layer. As in the paper, the decoder's causal self-attention and its
cross-attention become linear attention; the encoder's bidirectional self-attention stays softmax unless the model's
config says `t2r_encoder = "linear"` (then it becomes non-causal linear attention, every query reading all keys).

Cross-attention reads one fixed state per sentence: S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j) over the source
tokens (padded ones left out by the encoder's attention mask), computed at the first decoder call and kept in the
cross-attention half of HF's `EncoderDecoderCache` (a `RecurrentLayer` per decoder layer), so a decoded token costs
the same whatever the source length. Beam search reorders those states with the beams like any cache layer.

Cross-attention and the encoder always use the plain linear form (the recipe's feature map; its mixer applies only
to the causal decoder self-attention, where windows and gates mean something). Positions are absolute and added to
the embeddings (Marian: sinusoidal, BART: learned), so there is nothing to apply here.

T5, mT5 and UMT5 have their own adapter (`t5.py`, built on these classes): their decoder self-attention adds a learned
relative position bias to its scores, which causal linear attention does not form, so the conversion drops it (with
a warning; finetuning recovers what it carried) and their encoder stays softmax.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from ..attention import LinearAttention
from ..errors import UnsupportedModelError
from ..ops import linear_attention
from ..ops.common import LinearState, guard
from ..recipe import Recipe
from .base import Adapter, HFClasses, key_mask_from, register_adapter
from .cache import recurrent_slot

ENCODER_CHOICES = ("softmax", "linear")


def plain_linear(recipe: Recipe) -> Recipe:
    """The recipe's feature map with the plain linear mixer: the form of cross-attention and the encoder."""
    return replace(recipe, mixer="linear", window=0, mixer_options={})


def source_key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] bool (True = a real source token) from the mask HF hands cross- or encoder attention: None, a 2-D
    [B, S] mask, or a 4-D [B, 1, Tq, S] bidirectional mask, boolean (True = attend) or additive (0 = attend)."""
    if attention_mask is None:
        return None
    row = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0, 0, :]  # (B, S)
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2 if row.dtype.is_floating_point else row.bool()


class Seq2SeqLinearAttention(LinearAttention):
    """Base of the three converted attentions: shares the original's q/k/v/out projections."""

    shared = ("q_proj", "k_proj", "v_proj", "out_proj")

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> None:
        heads, head_dim = self.geometry(original)
        super().__init__(layer_idx=layer_idx, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                         scale=original.scaling, recipe=recipe)
        self.config = original.config
        self.dropout = original.dropout
        for name in self.shared:
            setattr(self, name, getattr(original, name))

    @staticmethod
    def geometry(original: nn.Module) -> tuple[int, int]:
        """(heads, head dim) of the attention module being replaced."""
        return original.num_heads, original.head_dim

    def heads(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.out_proj(o.flatten(2))  # (B, T, hidden)


class DecoderSelfLinearAttention(Seq2SeqLinearAttention):
    """Causal decoder self-attention: the recipe's mixer, state in the self-attention half of the cache."""

    def forward(self, hidden_states: torch.Tensor, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        q, k, v = (self.heads(p, hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj))
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        slot = recurrent_slot(cache, self.layer_idx)
        o = self.attend(q, k, v, key_mask=key_mask_from(attention_mask, q.shape[1]), slot=slot,
                        mode=kwargs.get("t2r_mode"))
        return self.output(o), None

    def transfer_pair(self, hidden_states: torch.Tensor, key_value_states=None, attention_mask=None, **kwargs):
        """(linear output, the pretrained softmax attention's output) [B, T, H, D] on the same input, before the
        output projection: what attention transfer compares. No cache."""
        q, k, v = (self.heads(p, hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = key_mask_from(attention_mask, q.shape[1])
        reference = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True, scale=self.scale).transpose(1, 2)
        return self.attend(q, k, v, key_mask=mask), reference


class CrossLinearAttention(Seq2SeqLinearAttention):
    """Cross-attention: phi(q_t)^T S / phi(q_t)^T z with (S, z) over the source, made once per sentence."""

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> None:
        super().__init__(original, layer_idx, plain_linear(recipe))

    def source_state(self, encoder_states: torch.Tensor, key_mask: torch.Tensor | None) -> LinearState:
        """(S [B, H, F, D], z [B, H, F]) float32 over the source tokens (padding left out)."""
        k, v = self.heads(self.k_proj, encoder_states), self.heads(self.v_proj, encoder_states)  # (B, S, H, D)
        phi_k = self.feature_map.phi(self.feature_map._as_float(k, "k"), is_key=True)  # (B, S, H, F)
        if key_mask is not None:
            phi_k = torch.where(key_mask[:, :, None, None], phi_k, 0.0)  # (B, S, H, F)
        S = torch.einsum("bshf,bshd->bhfd", phi_k, v.to(phi_k.dtype))  # (B, H, F, D)
        return LinearState(S, phi_k.sum(1))  # z: (B, H, F)

    def read(self, q: torch.Tensor, state: LinearState) -> torch.Tensor:
        """[B, T, H, D] attention output of queries q [B, T, H, D] against a source state."""
        phi_q = self.feature_map.phi(self.feature_map._as_float(q, "q"), is_key=False)  # (B, T, H, F)
        num = torch.einsum("bthf,bhfd->bthd", phi_q, state.S)  # (B, T, H, D)
        den = torch.einsum("bthf,bhf->bth", phi_q, state.z)  # (B, T, H)
        return (num / guard(den, self.recipe.eps).unsqueeze(-1)).to(q.dtype)

    def forward(self, hidden_states: torch.Tensor, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        if key_value_states is None:
            raise UnsupportedModelError("cross-attention was called without encoder states")
        q = self.heads(self.q_proj, hidden_states)  # (B, T, H, D)
        slot = recurrent_slot(cache.cross_attention_cache, self.layer_idx) \
            if isinstance(cache, EncoderDecoderCache) else None
        if slot is not None and slot.state is not None:
            state = slot.state  # the source was read at the first decoder call
        else:
            state = self.source_state(key_value_states, source_key_mask(attention_mask))
            if slot is not None:
                slot.advance(state, key_value_states.shape[1])
        return self.output(self.read(q, state)), None

    def transfer_pair(self, hidden_states: torch.Tensor, key_value_states=None, attention_mask=None, **kwargs):
        """(linear output, the pretrained softmax cross-attention's output) [B, T, H, D], before the output
        projection, over the real source tokens."""
        q = self.heads(self.q_proj, hidden_states)
        k, v = self.heads(self.k_proj, key_value_states), self.heads(self.v_proj, key_value_states)
        mask = source_key_mask(attention_mask)
        reference = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale,
            attn_mask=None if mask is None else mask[:, None, None, :]).transpose(1, 2)
        return self.read(q, self.source_state(key_value_states, mask)), reference


class EncoderLinearAttention(Seq2SeqLinearAttention):
    """Bidirectional encoder self-attention as non-causal linear attention (padded keys left out)."""

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> None:
        super().__init__(original, layer_idx, plain_linear(recipe))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        q, k, v = (self.heads(p, hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj))
        phi_q, phi_k = self.feature_map(q, k)  # (B, T, H, F)
        o, _ = linear_attention(phi_q, phi_k, v, key_mask=source_key_mask(attention_mask), causal=False,
                                eps=self.recipe.eps)
        return self.output(o), None


def seq2seq_names(family: str, prefix: str, lm: str) -> HFClasses:
    return HFClasses(f"{prefix}Config", lm, f"{prefix}Attention", f"transformers.models.{family}.modeling_{family}",
                     auto="AutoModelForSeq2SeqLM")


@register_adapter
class Seq2SeqAdapter(Adapter):
    """Marian and BART: `model.model.{encoder,decoder}.layers`, each decoder layer with `self_attn` and
    `encoder_attn`, each encoder layer with `self_attn`."""

    families = {"marian": seq2seq_names("marian", "Marian", "MarianMTModel"),
                "bart": seq2seq_names("bart", "Bart", "BartForConditionalGeneration")}
    attention_attr = "self_attn"
    lora_targets = r".*\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)"
    is_encoder_decoder = True

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.decoder.layers)

    def linear_attention(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> nn.Module:
        """A decoder layer's self-attention made linear (`swap` also converts its cross-attention)."""
        return DecoderSelfLinearAttention(original, layer_idx, recipe)

    def encoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.encoder.layers)

    def layer_windows(self, config) -> list[int | None]:
        return [None] * config.decoder_layers

    def max_positions(self, config) -> int | None:
        return config.max_position_embeddings

    def encoder_choice(self, config) -> str:
        return self.check_encoder(getattr(config, "t2r_encoder", "softmax"))

    def check_encoder(self, choice: str) -> str:
        """`choice` ("softmax" | "linear") if this family's encoder can take it, else UnsupportedModelError."""
        if choice not in ENCODER_CHOICES:
            raise UnsupportedModelError(f"t2r_encoder is {' or '.join(ENCODER_CHOICES)}, got {choice!r}")
        return choice

    def swap(self, model: nn.Module, recipe: Recipe) -> None:
        """Decoder self- and cross-attention of every layer not kept softmax; the encoder's when the config's
        `t2r_encoder` is "linear" (`keep_softmax_layers` counts decoder layers)."""
        layers = self.decoder_layers(model)
        recipe.check_layers(len(layers))
        for i, layer in enumerate(layers):
            if i not in recipe.keep_softmax_layers:
                layer.self_attn = DecoderSelfLinearAttention(layer.self_attn, i, recipe)
                layer.encoder_attn = CrossLinearAttention(layer.encoder_attn, i, recipe)
        if self.encoder_choice(model.config) == "linear":
            for i, layer in enumerate(self.encoder_layers(model)):
                layer.self_attn = EncoderLinearAttention(layer.self_attn, i, recipe)

    def restore(self, model: nn.Module, layers) -> list[int]:
        changed = []
        for i, layer in enumerate(self.decoder_layers(model)):
            if i in layers and isinstance(layer.self_attn, LinearAttention):
                layer.self_attn = self.softmax_module(layer.self_attn, model.config, causal=True)
                layer.encoder_attn = self.softmax_module(layer.encoder_attn, model.config, causal=False)
                changed.append(i)
        return changed

    def softmax_attention(self, linear: nn.Module, config) -> nn.Module:
        return self.softmax_module(linear, config, causal=isinstance(linear, DecoderSelfLinearAttention))

    def softmax_module(self, linear: Seq2SeqLinearAttention, config, causal: bool) -> nn.Module:
        classes = self.families[config.model_type.removeprefix("t2r_")]
        attention_cls = getattr(import_module(classes.module), classes.attention)
        with torch.device("meta"):  # placeholders, replaced by the shared projections below
            module = attention_cls(config.d_model, linear.num_heads, dropout=linear.dropout, is_decoder=True,
                                   is_causal=causal, config=config, layer_idx=linear.layer_idx)
        for name in linear.shared:
            setattr(module, name, getattr(linear, name))
        return module
