"""T5, mT5 and UMT5: the encoder-decoders whose attention knows positions only through a learned relative position
bias added to its scores (bucketed by the query-key distance; no 1/sqrt(d) scale).

Each decoder block `model.decoder.block[i]` holds its causal self-attention at `layer[0].SelfAttention` and its
cross-attention at `layer[1].EncDecAttention` (projections `q`, `k`, `v`, `o`, no biases). Both become linear
attention as for Marian (`seq2seq.py`, whose classes these subclass):

* Cross-attention has no position bias, so it converts exactly: one source state per sentence, kept in the cross
  half of `EncoderDecoderCache` and reordered with the beams.
* Decoder self-attention becomes the recipe's causal mixer, and its relative position bias is dropped: linear
  attention sums phi(k_j) v_j^T without ever forming the scores the bias is added to. Order still reaches the decoder
  through causality (each token reads only its prefix), not through distances. The conversion logs a warning;
  finetuning on pairs recovers what the bias carried. The bias weights stay in the model (same names), so
  `keep_softmax` / `restore` give the original attention back exactly, and attention transfer imitates the biased
  softmax attention.
* The encoder stays softmax with its bias: without the bias it would have no positions at all (a bidirectional
  linear attention would read the source as a bag of words), so `t2r_encoder = "linear"` is refused.

T5 and mT5 compute the bias in block 0 only and hand it to the later blocks (each attention returns
`(output, position_bias, weights)`); a converted block passes on what it got. When block 0 is converted and a later
block keeps softmax, the converted block 0 still computes the bias for it (`feeds_bias`, wired by the adapter),
since that layer's KV cache costs as much anyway. UMT5 gives every self-attention its own bias and returns
`(output, weights)`; nothing is handed on.
"""

from __future__ import annotations

import logging
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention

from ..attention import LinearAttention
from ..errors import UnsupportedModelError
from ..recipe import Recipe
from .base import HFClasses, key_mask_from, register_adapter
from .cache import recurrent_slot
from .seq2seq import CrossLinearAttention, DecoderSelfLinearAttention, Seq2SeqAdapter

log = logging.getLogger(__name__)
DROPPED_BIAS = ("%s: the decoder self-attention's relative position bias is dropped (causal linear attention forms "
                "no scores to add it to; order still comes from causality). Finetuning on pairs recovers what it "
                "carried; its weights are kept, so keep_softmax gives the original attention back")
LINEAR_ENCODER = ("a linear encoder is refused for {family}: its encoder knows word order only through the relative "
                  "position bias added to its scores, which non-causal linear attention would drop (reading the "
                  "source as a bag of words); keep the encoder softmax (the default)")


def relative_bias(table: nn.Embedding, config, query_length: int, key_length: int, past: int) -> torch.Tensor:
    """[1, H, T, K] T5 position bias of queries at positions past..past+T-1 against keys 0..K-1 (the decoder's
    causal buckets when `config.is_decoder`, else bidirectional), from the bucket table [buckets, H]."""
    device = table.weight.device
    context = torch.arange(query_length, device=device)[:, None] + past  # (T, 1)
    distance = torch.arange(key_length, device=device)[None, :] - context  # (T, K)
    buckets = T5Attention._relative_position_bucket(distance, bidirectional=not config.is_decoder,
                                                    num_buckets=config.relative_attention_num_buckets,
                                                    max_distance=config.relative_attention_max_distance)
    return table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, K)


class T5Projections:
    """T5's names and geometry for the Marian classes: projections q, k, v, o; n_heads x key_value_proj_dim."""

    shared = ("q", "k", "v", "o")
    q_proj = property(lambda self: self.q)
    k_proj = property(lambda self: self.k)
    v_proj = property(lambda self: self.v)
    out_proj = property(lambda self: self.o)

    @staticmethod
    def geometry(original: nn.Module) -> tuple[int, int]:
        return original.n_heads, original.key_value_proj_dim


class T5DecoderSelfAttention(T5Projections, DecoderSelfLinearAttention):
    """Causal decoder self-attention, the relative bias dropped. `table` is the bias of this layer's softmax
    attention (its own in block 0 and in UMT5, block 0's otherwise: not registered here); `feeds_bias` (set by
    `T5Adapter.wire_bias`) makes it compute that bias for later softmax blocks (T5, mT5)."""

    def __init__(self, original: nn.Module, layer_idx: int, recipe: Recipe, table: nn.Embedding | None = None) -> None:
        super().__init__(original, layer_idx, recipe)
        self.has_relative_attention_bias = original.has_relative_attention_bias
        if self.has_relative_attention_bias:  # kept under its own name: restore and the transfer reference use it
            self.relative_attention_bias = original.relative_attention_bias
        self.bias_table = (table if table is not None else getattr(original, "relative_attention_bias", None),)
        self.feeds_bias = False  # set by the adapter's `wire_bias`

    def relative_bias(self, query_length: int, key_length: int, past: int = 0) -> torch.Tensor:
        return relative_bias(self.bias_table[0], self.config, query_length, key_length, past)  # (1, H, T, K)

    def forward(self, hidden_states: torch.Tensor, mask=None, key_value_states=None, position_bias=None, cache=None,
                **kwargs):
        if position_bias is None and self.feeds_bias:
            slot = recurrent_slot(cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache,
                                  self.layer_idx)
            past, length = (slot.seen_tokens if slot is not None else 0), hidden_states.shape[1]
            position_bias = self.relative_bias(length, past + length, past)  # what block 0's softmax would hand on
        out, _ = super().forward(hidden_states, cache=cache, attention_mask=mask, **kwargs)
        return out, position_bias, None

    def transfer_pair(self, hidden_states: torch.Tensor, key_value_states=None, attention_mask=None, *, mask=None,
                      **kwargs):
        """(linear output, the pretrained softmax attention's output, its relative bias included) [B, T, H, D]."""
        q, k, v = (self.heads(p, hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj))
        T = q.shape[1]
        linear = self.attend(q, k, v, key_mask=key_mask_from(attention_mask if attention_mask is not None else mask, T))
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
        scores_bias = self.relative_bias(T, T).to(q.dtype).masked_fill(~causal, float("-inf"))  # (1, H, T, T)
        reference = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=scores_bias, scale=self.scale).transpose(1, 2)
        return linear, reference


class UMT5DecoderSelfAttention(T5DecoderSelfAttention):
    """UMT5's calling convention: `(hidden_states, encoder_hidden_states, cache, attention_mask)` -> (output, None)."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None, cache=None, attention_mask=None,
                **kwargs):
        return DecoderSelfLinearAttention.forward(self, hidden_states, cache=cache, attention_mask=attention_mask,
                                                  **kwargs)


class T5CrossAttention(T5Projections, CrossLinearAttention):
    """Cross-attention (no position bias in any T5): exactly Marian's, in T5's calling convention; the bias handed
    between blocks passes through."""

    def forward(self, hidden_states: torch.Tensor, mask=None, key_value_states=None, position_bias=None, cache=None,
                **kwargs):
        out, _ = super().forward(hidden_states, key_value_states=key_value_states, cache=cache, attention_mask=mask)
        return out, position_bias, None

    def transfer_pair(self, hidden_states: torch.Tensor, key_value_states=None, attention_mask=None, *, mask=None,
                      encoder_hidden_states=None, **kwargs):
        source = key_value_states if key_value_states is not None else encoder_hidden_states
        if source is None:  # UMT5 names the source `encoder_hidden_states`: the caller must hand on the call's kwargs
            raise UnsupportedModelError("attention transfer got no encoder states for this cross-attention: pass "
                                        "transfer_pair the keywords the module was called with")
        return super().transfer_pair(hidden_states, source, attention_mask if attention_mask is not None else mask)


class UMT5CrossAttention(T5CrossAttention):
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None, cache=None, attention_mask=None,
                **kwargs):
        return CrossLinearAttention.forward(self, hidden_states, key_value_states=encoder_hidden_states, cache=cache,
                                            attention_mask=attention_mask)


def t5_names(family: str, prefix: str) -> HFClasses:
    return HFClasses(f"{prefix}Config", f"{prefix}ForConditionalGeneration", f"{prefix}Attention",
                     f"transformers.models.{family}.modeling_{family}", auto="AutoModelForSeq2SeqLM")


@register_adapter
class T5Adapter(Seq2SeqAdapter):
    """T5, mT5, UMT5: `model.{encoder,decoder}.block[i].layer[0].SelfAttention`, decoder blocks with
    `layer[1].EncDecAttention`. `decoder_layers` are the blocks' self-attention sublayers (`layer[0]`)."""

    families = {"t5": t5_names("t5", "T5"), "mt5": t5_names("mt5", "MT5"), "umt5": t5_names("umt5", "UMT5")}
    attention_attr = "SelfAttention"
    lora_targets = r".*\.(SelfAttention|EncDecAttention)\.(q|k|v|o)"

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return [block.layer[0] for block in model.decoder.block]

    def cross_layers(self, model: nn.Module) -> list[nn.Module]:
        return [block.layer[1] for block in model.decoder.block]

    def encoder_layers(self, model: nn.Module) -> list[nn.Module]:
        return [block.layer[0] for block in model.encoder.block]

    def layer_windows(self, config) -> list[int | None]:
        return [None] * config.num_decoder_layers

    def max_positions(self, config) -> int | None:
        return None  # relative positions: no length limit (however well they extrapolate)

    def check_encoder(self, choice: str) -> str:
        if choice == "linear":
            raise UnsupportedModelError(LINEAR_ENCODER.format(family="T5 and its relatives"))
        return super().check_encoder(choice)

    def is_umt5(self, model: nn.Module) -> bool:
        return model.config.model_type.removeprefix("t2r_") == "umt5"

    def linear_attention(self, original: nn.Module, layer_idx: int, recipe: Recipe) -> nn.Module:
        """A decoder self-attention made linear, on its own (`swap` wires the shared bias and the cross-attention)."""
        return T5DecoderSelfAttention(original, layer_idx, recipe)

    def swap(self, model: nn.Module, recipe: Recipe) -> None:
        """Decoder self- and cross-attention of every block not kept softmax (the encoder stays softmax)."""
        self.encoder_choice(model.config)
        selfs, crosses = self.decoder_layers(model), self.cross_layers(model)
        recipe.check_layers(len(selfs))
        umt5 = self.is_umt5(model)
        self_cls, cross_cls = (UMT5DecoderSelfAttention, UMT5CrossAttention) if umt5 else \
            (T5DecoderSelfAttention, T5CrossAttention)
        first_table = selfs[0].SelfAttention.relative_attention_bias
        for i, (sub, cross) in enumerate(zip(selfs, crosses)):
            if i not in recipe.keep_softmax_layers:
                sub.SelfAttention = self_cls(sub.SelfAttention, i, recipe, table=None if umt5 else first_table)
                cross.EncDecAttention = cross_cls(cross.EncDecAttention, i, recipe)
        self.wire_bias(model)
        if not isinstance(getattr(model.config, "t2r", None), dict):  # converting now, not loading a converted model
            log.warning(DROPPED_BIAS, model.config.model_type)

    def wire_bias(self, model: nn.Module) -> None:
        """T5 / mT5: a converted block 0 computes the position bias iff a later block keeps softmax (it needs it)."""
        if self.is_umt5(model):
            return
        modules = [sub.SelfAttention for sub in self.decoder_layers(model)]
        if isinstance(modules[0], T5DecoderSelfAttention):
            modules[0].feeds_bias = any(not isinstance(m, LinearAttention) for m in modules[1:])

    def restore(self, model: nn.Module, layers) -> list[int]:
        changed = []
        for i, (sub, cross) in enumerate(zip(self.decoder_layers(model), self.cross_layers(model))):
            if i in layers and isinstance(sub.SelfAttention, LinearAttention):
                sub.SelfAttention = self.softmax_attention(sub.SelfAttention, model.config)
                cross.EncDecAttention = self.softmax_attention(cross.EncDecAttention, model.config)
                changed.append(i)
        self.wire_bias(model)
        return changed

    def softmax_attention(self, linear: nn.Module, config) -> nn.Module:
        """The family's own attention around `linear`'s projections (and its bias table, where it had one)."""
        classes = self.families[config.model_type.removeprefix("t2r_")]
        attention_cls = getattr(import_module(classes.module), classes.attention)
        causal = isinstance(linear, T5DecoderSelfAttention)
        has_bias = causal and linear.has_relative_attention_bias
        with torch.device("meta"):  # placeholders, replaced by the shared modules below
            module = attention_cls(linear.config, has_relative_attention_bias=has_bias, layer_idx=linear.layer_idx,
                                   is_causal=causal)
        for name in linear.shared + (("relative_attention_bias",) if has_bias else ()):
            setattr(module, name, getattr(linear, name))
        return module
