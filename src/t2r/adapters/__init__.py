"""The only package that knows HF transformers internals: one module per model family, plus the cache and the
registered converted classes. A new transformers release can break only this folder."""

from . import gemma3, gpt2, llama, olmo2, phi3, seq2seq, t5  # noqa: F401  (registers the adapters)
from .base import ADAPTERS, adapter_for, key_mask_from, restore_softmax, supported_model_types, swap_attention
from .cache import RecurrentCache, RecurrentLayer, cache_bytes, extend_kv_cache, recurrent_slot
from .classes import CONVERTED_CLASSES, auto_class, is_converted, mark_converted, original_model, register_all

register_all()

__all__ = [
    "ADAPTERS", "CONVERTED_CLASSES", "RecurrentCache", "auto_class", "RecurrentLayer", "adapter_for", "cache_bytes", "extend_kv_cache",
    "is_converted", "key_mask_from", "mark_converted", "original_model", "recurrent_slot", "restore_softmax",
    "supported_model_types", "swap_attention",
]
