"""The explicit-state step (`t2r.step`): the same logits and tokens as the model's own forward with a cache, eager
and compiled; and a clear reason where a model has no such step."""

from __future__ import annotations

import pytest
import torch

import t2r
from conftest import tiny_model
from t2r.decode import decode
from t2r.step import (
    StateStep,
    StepModel,
    compile_unavailable,
    compiled_decoder,
    flatten_states,
    state_layout,
    zero_states,
)

RECIPES = {"hedgehog": ("llama", dict(feature_map="hedgehog", feature_dim=8)),
           "window": ("llama", dict(feature_map="t2r", feature_dim=8, window=4)),
           "qwen2-elu": ("qwen2", dict(feature_map="elu"))}


def _converted(name):
    family, recipe = RECIPES[name]
    return t2r.convert(tiny_model(family), **recipe).eval()


def _padded_batch():
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_eager_step_gives_the_models_tokens_with_left_padding(name):
    model = _converted(name)
    ids, mask = _padded_batch()
    want, _ = decode(model, ids, mask, max_new_tokens=12)
    got, _ = decode(StepModel(model, lambda layout: StateStep(model, layout)), ids, mask, max_new_tokens=12,
                    cache=t2r.new_cache(model))
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["hedgehog", "window"])
def test_step_logits_and_state_match_the_cached_forward(name):
    model = _converted(name)
    ids = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = t2r.new_cache(model)
        model(input_ids=ids[:, :9], cache=cache, use_cache=True)
        layout, state = state_layout(cache), flatten_states(cache)
        pos = torch.full((3, 1), 9)
        logits, *new = StateStep(model, layout)(ids[:, 9:], pos, *state)
        ref = model(input_ids=ids[:, 9:], position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(new, flatten_states(cache)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prefill_from_zero_states_equals_a_fresh_forward():
    model = _converted("window")
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    state, layout = zero_states(model, 2)
    with torch.inference_mode():
        logits, *_ = StateStep(model, layout)(ids, torch.arange(7).expand(2, 7), *state)
        ref = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_no_step_for_kept_softmax_layers_or_other_families():
    kept = t2r.convert(tiny_model("llama"), feature_map="elu", keep_softmax_layers=(1,))
    assert "keep softmax attention" in compile_unavailable(kept)
    gpt2 = t2r.convert(tiny_model("gpt2"), feature_map="elu")
    reason = compile_unavailable(gpt2)
    assert "no explicit-state decode step" in reason
    built = compiled_decoder(gpt2)
    assert not built.compiled and built.model is gpt2 and built.reason == reason


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens():
    """torch.compile (inductor, CPU) of the step: ~30-60 s of compilation per batch size on this machine."""
    model = _converted("hedgehog")
    ids, mask = _padded_batch()
    want, _ = decode(model, ids, mask, max_new_tokens=10)
    built = compiled_decoder(model)
    assert built.compiled, built.reason
    got, _ = decode(built.model, ids, mask, max_new_tokens=10, cache=t2r.new_cache(model))
    assert torch.equal(got, want)
