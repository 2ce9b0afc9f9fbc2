"""The adapter contract, run over every registered adapter on tiny random models of each family (and the family
variants whose softmax layers slide): a swap changes only attention, the original is rebuilt from a converted model,
the LoRA targets exist, and the softmax reference that attention transfer imitates equals the unconverted layer's own
attention output. An unknown family is refused with the list of supported ones."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

import t2r
from conftest import longrope, tiny_config
from t2r.adapters import ADAPTERS, adapter_for, original_model
from t2r.attention import LinearAttention, is_conversion_parameter
from t2r.errors import UnsupportedModelError
from t2r.lora import apply_lora
from t2r.recipe import Recipe
from t2r.transfer import attention_rows

# Every registered model type with its quirks on (see conftest.FAMILY_QUIRKS), plus variants: softmax layers that
# slide (window 8 < the 24 tokens used), rotary scalings, LongRoPE's long factors (24 > 16 positions).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("mistral", {}),
    "mistral-sliding": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3-sliding": ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "phi3": ("phi3", {}),
    "phi3-longrope-long-sliding": ("phi3", {**longrope(16), "sliding_window": 8}),
    "olmo2": ("olmo2", {}),
    "gemma3_text-sliding": ("gemma3_text", {}),
    "gpt2": ("gpt2", {}),
}
RECIPE = Recipe(feature_map="hedgehog", feature_dim=8, window=4)


def build(variant: str, seed: int = 0):
    family, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_every_registered_family_is_covered():
    # encoder-decoder families (Marian, BART) are covered by tests/test_seq2seq.py
    decoder_only = {name for name in ADAPTERS.names()
                    if ADAPTERS.get(name).families[name].auto == "AutoModelForCausalLM"}
    assert {family for family, _ in VARIANTS.values()} == decoder_only


def test_unknown_family_is_refused_with_the_supported_ones():
    config = transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32)
    known = "bart, gemma3_text, gpt2, llama, marian, mistral, mt5, olmo2, phi3, qwen2, qwen3, t5, umt5"
    with pytest.raises(UnsupportedModelError, match=f"no t2r adapter for model type 'opt'.*supported: {known}$"):
        adapter_for(transformers.OPTForCausalLM(config))
    with pytest.raises(UnsupportedModelError, match=f"supported: {known}$"):
        apply_lora(transformers.OPTForCausalLM(config), 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_windows_describe_every_layer(variant):
    model = build(variant)
    adapter = adapter_for(model)
    windows = adapter.layer_windows(model.config)
    assert len(windows) == len(adapter.decoder_layers(model))
    assert any(w == 8 for w in windows) == variant.endswith("-sliding")
    assert all(w in (None, 8) for w in windows)


@pytest.mark.parametrize("variant", VARIANTS)
def test_swap_changes_only_attention(variant):
    model = build(variant)
    adapter = adapter_for(model)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    others = {name: m for name, m in model.named_modules() if f".{adapter.attention_attr}" not in f".{name}"}
    t2r.convert(model, recipe=RECIPE)
    after = model.state_dict()
    for name, (value, ptr) in before.items():
        assert torch.equal(after[name], value) and after[name].data_ptr() == ptr, name
    added = set(after) - set(before)
    assert added and all(is_conversion_parameter(k) for k in added), sorted(added)[:4]
    now = dict(model.named_modules())
    assert all(now[name] is module for name, module in others.items()), "a module outside attention was replaced"
    assert all(isinstance(getattr(layer, adapter.attention_attr), LinearAttention)
               for layer in adapter.decoder_layers(model))


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_is_rebuilt_from_a_converted_model(variant):
    model = build(variant)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        rebuilt = original_model(t2r.convert(model, recipe=RECIPE))
        assert not any(isinstance(m, LinearAttention) for m in rebuilt.modules())
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_targets_exist_in_every_layer(variant):
    model = t2r.convert(build(variant), recipe=RECIPE)
    adapter = adapter_for(model)
    names = {module: name for name, module in model.named_modules()}
    for layer in adapter.decoder_layers(model):
        inside = [names[m] for m in getattr(layer, adapter.attention_attr).modules()]
        assert any(re.fullmatch(adapter.lora_targets, n) for n in inside), inside
    peft_model = apply_lora(model, 2)
    lora_layers = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert len(lora_layers) >= len(adapter.decoder_layers(model))  # at least one adapted projection per layer
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or is_conversion_parameter(n) for n in trainable)


def _captured_attention(model, adapter, ids):
    """Each layer's attention input (hidden states, position embeddings) and output, from the unconverted model."""
    seen = {}

    def hook_for(i):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] = (hidden, kwargs.get("position_embeddings"), output[0])
        return hook

    layers = adapter.decoder_layers(model)
    handles = [getattr(layer, adapter.attention_attr).register_forward_hook(hook_for(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return [seen[i] for i in range(len(layers))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_softmax_reference_equals_the_unconverted_attention(variant):
    """The target of attention transfer is the layer's own softmax attention: causal, or over its sliding window."""
    model = build(variant)
    adapter = ADAPTERS.get(VARIANTS[variant][0])()
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    captured = _captured_attention(model, adapter, ids)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        hidden, positions, expected = captured[i]
        linear = adapter.linear_attention(getattr(layer, adapter.attention_attr), i, RECIPE)  # shares projections
        with torch.no_grad():
            q, k, v = linear.qkv(hidden, positions)
            reference = adapter.softmax_reference(linear, q, k, v)  # (B, T, H, D)
            torch.testing.assert_close(linear.output(reference), expected, rtol=1e-5, atol=1e-5)
            softmax_rows, _ = attention_rows(linear, q, k, v, adapter)  # the quadratic twin of the same weights
            groups = q.shape[2] // v.shape[2]
            v_heads = v.repeat_interleave(groups, dim=2).transpose(1, 2)  # (B, H, T, D)
            torch.testing.assert_close((softmax_rows @ v_heads).transpose(1, 2), reference, rtol=1e-4, atol=1e-5)


def test_conversion_and_the_rebuilt_original_leave_the_callers_rng_alone():
    model = build("llama")
    state = torch.get_rng_state()
    converted = t2r.convert(model, recipe=RECIPE)
    original_model(converted)
    assert torch.equal(torch.get_rng_state(), state)
