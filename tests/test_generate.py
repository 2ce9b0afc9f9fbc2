"""HF generate() through the recurrent state cache: greedy, sampling, top-p/top-k, stopping criteria, batches with
left padding, and a state whose size does not depend on the number of tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import t2r
from conftest import tiny_model
from t2r.adapters import RecurrentCache, RecurrentLayer
from t2r.generate import Sampling

RECIPES = {
    "linear": dict(feature_map="hedgehog", feature_dim=8),
    "window-kept": dict(feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,)),
}
PROMPTS = ["The cat sat", "Once upon a time, in a land far away", "Hi"]


def converted(recipe, family="llama", tokenizer=None):
    return t2r.convert(tiny_model(family, vocab_size=len(tokenizer)), **RECIPES[recipe])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_equals_rows_alone(recipe, family, tokenizer):
    model = converted(recipe, family, tokenizer)
    batch = t2r.generate(model, tokenizer, PROMPTS, max_new_tokens=12)
    for i, prompt in enumerate(PROMPTS):
        alone = t2r.generate(model, tokenizer, prompt, max_new_tokens=12)
        assert alone.texts[0] == batch.texts[i], (prompt, alone.texts[0], batch.texts[i])


@pytest.mark.parametrize("recipe", RECIPES)
def test_greedy_tokens_are_argmax_of_full_forward(recipe, tokenizer):
    """Each greedy token (decoded recurrently) is the argmax of the parallel full forward at that position."""
    model = converted(recipe, tokenizer=tokenizer)
    enc = tokenizer("Greedy check", return_tensors="pt")
    cache = t2r.new_cache(model)
    out = model.generate(**enc, cache=cache, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=out, use_cache=False).logits
    assert torch.equal(logits[0, n - 1:-1].argmax(-1), out[0, n:])


def test_state_bytes_do_not_grow_with_tokens(tokenizer):
    model = converted("linear", tokenizer=tokenizer)
    short = t2r.generate(model, tokenizer, "a", max_new_tokens=4)
    long = t2r.generate(model, tokenizer, "a " * 60, max_new_tokens=40)
    assert short.state_bytes == long.state_bytes > 0


def test_window_adds_fixed_bytes_kept_layer_grows(tokenizer):
    model = converted("window-kept", tokenizer=tokenizer)
    cache = t2r.new_cache(model)
    assert isinstance(cache, RecurrentCache)
    enc = tokenizer("x" * 30, return_tensors="pt")
    model(**enc, cache=cache, use_cache=True)
    linear_bytes = [layer.nbytes() for layer in cache.layers if isinstance(layer, RecurrentLayer)]
    for _ in range(10):
        step = model(input_ids=enc["input_ids"][:, :1], cache=cache, use_cache=True)
        assert step.logits.shape[1] == 1
    assert [layer.nbytes() for layer in cache.layers if isinstance(layer, RecurrentLayer)] == linear_bytes
    assert cache.get_seq_length() == 40
    assert cache.layers[1].get_seq_length() == 40  # the kept softmax layer holds its keys


def test_plain_forward_with_use_cache_builds_recurrent_state(tokenizer):
    """A forward that lets HF create its own DynamicCache still gets recurrent layers."""
    model = converted("linear", tokenizer=tokenizer)
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert all(isinstance(layer, RecurrentLayer) for layer in out.cache.layers)


def test_sampling_is_seeded_and_options_apply(tokenizer):
    model = converted("linear", tokenizer=tokenizer)
    sampling = Sampling(do_sample=True, top_p=0.9, top_k=50, seed=3)
    before = torch.get_rng_state()
    a = t2r.generate(model, tokenizer, "Sample", max_new_tokens=10, sampling=sampling)
    assert torch.equal(torch.get_rng_state(), before)  # seeded inside a fork: the caller's RNG state is untouched
    b = t2r.generate(model, tokenizer, "Sample", max_new_tokens=10, sampling=sampling)
    greedy = t2r.generate(model, tokenizer, "Sample", max_new_tokens=10)
    top1 = t2r.generate(model, tokenizer, "Sample", max_new_tokens=10,
                        sampling=Sampling(do_sample=True, top_k=1, seed=4))
    assert a.texts == b.texts
    assert top1.texts == greedy.texts
    with pytest.raises(t2r.T2RError, match="top_p"):
        Sampling(do_sample=True, top_p=1.5)


def test_stopping_criteria_stop_early(tokenizer):
    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n = n

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n, dtype=torch.bool)

    model = converted("linear", tokenizer=tokenizer)
    prompt_len = len(tokenizer("Stop")["input_ids"])
    result = t2r.generate(model, tokenizer, "Stop", max_new_tokens=30,
                          stopping_criteria=StoppingCriteriaList([StopAfter(prompt_len + 5)]))
    assert result.new_tokens == 5


def test_beam_search_runs(tokenizer):
    model = converted("window-kept", tokenizer=tokenizer)
    enc = tokenizer("Beam", return_tensors="pt")
    out = model.generate(**enc, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, enc["input_ids"].shape[1] + 6)
