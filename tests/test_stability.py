"""Numerical stability (issue 15): the recurrent state stays finite and equal to the chunked (parallel) form over long
streams (100k tokens), the normaliser never divides by ~0 for any feature map and mixer (all-zero, huge and negative
keys), and half-precision inputs keep a float32 state. CPU, float32, fixed seeds.

The 100k-token checks step each mixer's recurrent form (its token-by-token loop, the one decoding uses) over the
stream and compare it with the chunked form: stepping a whole model 100k times through `forward` takes minutes here,
so that run is the `slow` test at the end."""

from __future__ import annotations

import pytest
import torch

import t2r
from conftest import tiny_model
from t2r.attention import LinearAttention
from t2r.feature_maps import FEATURE_MAPS
from t2r.recipe import Recipe

H, D = 2, 8
MIXERS = [("linear", 0), ("window", 4), ("gla", 0), ("delta", 0), ("gated_delta", 4)]
MIXER_IDS = [f"{m}-w{w}" for m, w in MIXERS]
LONG = 100_000
LONG_TOL = 1e-4  # float32 sums over 100k steps in two orders (the chunked form and the loop)


def layer(mixer: str, window: int, feature_map: str = "hedgehog", feature_dim: int | None = 8) -> LinearAttention:
    torch.manual_seed(0)
    recipe = Recipe(feature_map=feature_map, feature_dim=feature_dim, mixer=mixer, window=window, chunk_size=64)
    return LinearAttention(layer_idx=0, num_heads=H, num_kv_heads=H, head_dim=D, scale=D**-0.5, recipe=recipe)


def inputs(T: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, H, D, generator=g).to(dtype) for _ in range(3)]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_long_stream(mixer: str, window: int, T: int) -> None:
    att = layer(mixer, window)
    q, k, v = inputs(T)
    with torch.no_grad():
        phi_q, phi_k = att.feature_map(q, k)
        o_chunk, s_chunk = att.mixer(q, k, v, phi_q, phi_k, mode="chunk", output_final_state=True)
        o_step, s_step = att.mixer(q, k, v, phi_q, phi_k, mode="recurrent", output_final_state=True)
    assert torch.isfinite(o_step).all() and torch.isfinite(o_chunk).all()
    assert rel(o_chunk, o_step) < LONG_TOL
    assert rel(o_chunk[:, -1000:], o_step[:, -1000:]) < LONG_TOL  # no drift at the end of the stream
    for a, b in zip(s_chunk, s_step):
        if a.is_floating_point():
            assert torch.isfinite(b).all() and b.dtype == torch.float32
            assert rel(a, b) < LONG_TOL


@pytest.mark.parametrize("mixer, window, T", [("linear", 0, LONG), ("delta", 0, LONG), ("window", 4, 16_384),
                                              ("gla", 0, 16_384), ("gated_delta", 4, 16_384)])
def test_recurrent_state_equals_the_chunked_form_over_a_long_stream(mixer, window, T):
    check_long_stream(mixer, window, T)


@pytest.mark.slow
@pytest.mark.parametrize("mixer, window", [("window", 4), ("gla", 0), ("gated_delta", 4)])
def test_recurrent_state_equals_the_chunked_form_over_100k_tokens(mixer, window):
    check_long_stream(mixer, window, LONG)


def adversarial(kind: str, T: int = 40):
    q, k, v = inputs(T, seed=1)
    if kind == "zero":
        q, k = torch.zeros_like(q), torch.zeros_like(k)
    elif kind == "huge":
        q, k = q * 1e4, k * 1e4
    elif kind == "negative-keys":
        k = -k.abs() * 30
    elif kind == "zero-keys":
        k = torch.zeros_like(k)
    return q, k, v


@pytest.mark.parametrize("kind", ["random", "zero", "huge", "negative-keys", "zero-keys"])
@pytest.mark.parametrize("mixer, window", MIXERS, ids=MIXER_IDS)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS.names())
def test_the_normaliser_never_divides_by_zero(feature_map, mixer, window, kind):
    """Every output finite in every mode; a normalised mixer's output a weighted mean of the values (|o| <= max |v|),
    never blown up by a denominator near 0."""
    att = layer(mixer, window, feature_map, feature_dim=None)
    q, k, v = adversarial(kind)
    with torch.no_grad():
        for mode in ("chunk", "recurrent", "quadratic"):
            o = att.attend(q, k, v, mode=mode)
            assert torch.isfinite(o).all(), f"{mode}: not finite"
            if att.mixer.normalised:
                assert float(o.abs().max()) <= float(v.abs().max()) * (1 + 1e-4), f"{mode}: |o| > max |v|"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixer, window", MIXERS, ids=MIXER_IDS)
def test_half_precision_inputs_keep_a_float32_state(mixer, window, dtype):
    att = layer(mixer, window)
    q, k, v = inputs(33, dtype=dtype)
    with torch.no_grad():
        phi_q, phi_k = att.feature_map(q, k)
        o, state = att.mixer(q, k, v, phi_q, phi_k, mode="chunk", output_final_state=True)
        o32, _ = att.mixer(q.float(), k.float(), v.float(), phi_q, phi_k, mode="chunk", output_final_state=True)
    assert o.dtype == dtype and torch.isfinite(o).all()
    for name, x in zip(state._fields, state):  # the sums are float32; the window's own copies of the last keys and
        if name in ("k", "v"):                 # values (no accumulation: a small KV cache) keep the model's dtype
            assert x.dtype == dtype
        elif x.is_floating_point():
            assert x.dtype == torch.float32, name
    assert rel(o.float(), o32) < 2e-2


@pytest.mark.slow
def test_a_tiny_model_decodes_100k_tokens_with_the_state_of_its_chunked_prefill():
    """100k greedy tokens, one recurrent step each (`t2r.decode`), then the same tokens through a chunked prefill:
    every layer's state finite and equal. Minutes on CPU."""
    model = t2r.convert(tiny_model("llama", vocab_size=64, num_hidden_layers=2, max_position_embeddings=LONG + 64),
                        feature_map="hedgehog", feature_dim=8)
    decoded, prefilled = decoded_and_prefilled(model, torch.tensor([[1, 5, 9, 13]]), LONG, piece=8192)
    for a, b in zip(decoded.layers, prefilled.layers):
        for x, y in zip(a.state, b.state):
            if x.is_floating_point():
                assert torch.isfinite(x).all() and rel(x, y) < LONG_TOL


def decoded_and_prefilled(model, prompt: torch.Tensor, tokens: int, piece: int = 2048):
    """(the cache after decoding `tokens` greedy tokens one step at a time, the cache after a chunked prefill of the
    same stream), and the stream."""
    with torch.inference_mode():
        decoded = t2r.new_cache(model)
        new, decoded = t2r.decode(model, prompt, max_new_tokens=tokens, cache=decoded, eos_token_id=None)
        stream = torch.cat([prompt, new[:, :-1]], dim=1)  # the last token is emitted, not yet read
        prefilled = t2r.new_cache(model)
        for start in range(0, stream.shape[1], piece):
            chunk = stream[:, start:start + piece]
            model(input_ids=chunk, position_ids=torch.arange(start, start + chunk.shape[1])[None], cache=prefilled,
                  use_cache=True)
    return decoded, prefilled


@pytest.mark.slow
def test_smollm2_decodes_16k_tokens_with_the_state_of_its_chunked_prefill():
    """SmolLM2-135M converted with the default recipe: 16,384 greedy tokens, one recurrent step each, then the same
    tokens through a chunked prefill: every layer's state finite and equal (float32 over 30 layers). Many minutes."""
    from t2r.sources import load_model

    model, tokenizer, _ = load_model(None)
    t2r.convert(model)
    prompt = tokenizer("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    decoded, prefilled = decoded_and_prefilled(model, prompt, 16_384)
    for a, b in zip(decoded.layers, prefilled.layers):
        for x, y in zip(a.state, b.state):
            if x.is_floating_point():
                assert torch.isfinite(x).all() and rel(x, y) < 1e-3
