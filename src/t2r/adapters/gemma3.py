"""Gemma 3 (`gemma3_text`): local layers attend over a sliding window (512 tokens in the released models), one
global layer in six over the whole context; one KV head of 256 dims; per-head q/k RMS norms (Gemma's `1 + weight`
form, the modules themselves are reused); softmax scale `query_pre_attn_scalar ** -0.5`; a rotary base per layer
type (HF hands each layer its own cos/sin); embeddings scaled by sqrt(hidden) (outside attention: untouched).

Converting only the global layers (`t2r convert --convert-layers global`) keeps the local layers' own softmax over
their window: their cache holds at most W - 1 tokens and the global layers a fixed recurrent state, so the whole
model decodes in bounded memory. A converted local layer's attention-transfer target is its sliding-window softmax.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import HFClasses, register_adapter
from .llama import LlamaAdapter


@register_adapter
class Gemma3Adapter(LlamaAdapter):
    families = {"gemma3_text": HFClasses("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3Attention",
                                         "transformers.models.gemma3.modeling_gemma3")}
    gguf_architectures = {"gemma3": "gemma3_text"}  # what HF's GGUF loader maps it to
    every_layer_slides = ()

    def check(self, model: nn.Module) -> None:
        config = model.config
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError("Gemma attention with logit soft-capping (attn_logit_softcapping) is not "
                                        "supported: linear attention has no logits to cap")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma 3 with bidirectional attention (an encoder) is not a causal LM: "
                                        "t2r converts causal attention only")
