"""The lean decode loop gives HF generate's tokens (greedy, left padding, EOS), and its sampling is reproducible."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import t2r
from conftest import tiny_model
from t2r.adapters import original_model
from t2r.decode import decode, iter_decode, positions_from_mask, process_logits
from t2r.errors import T2RError
from t2r.generate import Sampling

RECIPES = {
    "llama-hedgehog": ("llama", dict(feature_map="hedgehog", feature_dim=8)),
    "llama-window-kept": ("llama", dict(feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,))),
    "qwen2-elu": ("qwen2", dict(feature_map="elu")),
    "gpt2-hedgehog": ("gpt2", dict(feature_map="hedgehog", feature_dim=8)),
}


def _converted(name: str):
    family, recipe = RECIPES[name]
    return t2r.convert(tiny_model(family), **recipe)


def _batch(pad: int = 3, length: int = 11, seed: int = 0):
    """Two prompts; row 1 is left-padded by `pad` (pad id 0)."""
    ids = torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


def _hf_greedy(model, ids, mask, max_new_tokens: int, eos):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, cache=t2r.new_cache(model),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("which", ["converted", "original"])
def test_greedy_matches_hf_generate_with_left_padding(name, which):
    model = _converted(name)
    model = original_model(model) if which == "original" else model
    ids, mask = _batch()
    ours, _ = decode(model, ids, mask, max_new_tokens=9, eos_token_id=299, pad_token_id=0)
    assert ours.shape == (2, 9)
    assert torch.equal(ours, _hf_greedy(model, ids, mask, 9, eos=299))


@pytest.mark.parametrize("name", ["llama-hedgehog", "llama-window-kept"])
def test_eos_pads_finished_rows_like_hf(name):
    model = _converted(name)
    ids, mask = _batch()
    free, _ = decode(model, ids, mask, max_new_tokens=8)
    eos = int(free[0, 2])  # row 0 stops at its third token
    ours, _ = decode(model, ids, mask, max_new_tokens=8, eos_token_id=[eos], pad_token_id=0)
    assert torch.equal(ours, _hf_greedy(model, ids, mask, 8, eos=eos))
    assert ours[0, 2] == eos and (ours[0, 3:] == 0).all()


def test_stops_when_every_row_has_stopped():
    model = _converted("llama-hedgehog")
    ids, mask = _batch()
    free, _ = decode(model, ids, mask, max_new_tokens=6)
    eos = [int(free[0, 1]), int(free[1, 1])]
    ours, _ = decode(model, ids, mask, max_new_tokens=6, eos_token_id=eos)
    assert ours.shape[1] <= 2


def test_stopping_criteria_per_row():
    model = _converted("llama-hedgehog")
    ids, mask = _batch()
    seen = []

    def after_four(sequence, scores):
        seen.append(sequence.shape[1])
        return torch.full((sequence.shape[0],), sequence.shape[1] >= ids.shape[1] + 4)

    ours, _ = decode(model, ids, mask, max_new_tokens=10, stopping_criteria=after_four)
    assert ours.shape == (2, 4) and seen[0] == ids.shape[1] + 1


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = _converted("llama-window-kept")
    ids, mask = _batch()
    options = dict(do_sample=True, temperature=1.3, top_p=0.9, top_k=50)
    a, _ = decode(model, ids, mask, max_new_tokens=8, sampling=Sampling(**options, seed=7))
    b, _ = decode(model, ids, mask, max_new_tokens=8, sampling=Sampling(**options, seed=7))
    c, _ = decode(model, ids, mask, max_new_tokens=8, sampling=Sampling(**options, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy, _ = decode(model, ids, mask, max_new_tokens=8)
    top1, _ = decode(model, ids, mask, max_new_tokens=8, sampling=Sampling(do_sample=True, top_k=1, seed=0))
    assert torch.equal(greedy, top1)


def test_sampling_leaves_the_global_rng_alone():
    """A seeded sampling run draws from its own generator; without a seed it draws from (never seeds) the global RNG."""
    model = _converted("llama-hedgehog")
    ids, mask = _batch()
    before = torch.get_rng_state()
    decode(model, ids, mask, max_new_tokens=4, sampling=Sampling(do_sample=True, seed=3))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(11)
    a, _ = decode(model, ids, mask, max_new_tokens=4, sampling=Sampling(do_sample=True, seed=None))
    torch.manual_seed(11)
    b, _ = decode(model, ids, mask, max_new_tokens=4, sampling=Sampling(do_sample=True, seed=None))
    assert torch.equal(a, b)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.8), (0.9, 20, 0.5)])
def test_process_logits_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), expected)


def test_continues_a_filled_cache():
    """iter_decode from a cache that already holds the prompt == decode of the whole prompt."""
    model = _converted("llama-hedgehog")
    ids, _ = _batch(pad=0)
    full, _ = decode(model, ids, max_new_tokens=5)
    cache = t2r.new_cache(model)
    with torch.inference_mode():
        model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
    steps = list(iter_decode(model, ids[:, -1:], cache=cache, max_new_tokens=5))
    assert torch.equal(torch.stack(steps, 1), full)


def test_positions_follow_hf_for_left_padding():
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_bad_options_raise():
    model = _converted("llama-hedgehog")
    ids, mask = _batch()
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0)):
        with pytest.raises(T2RError):
            decode(model, ids, mask, max_new_tokens=2, sampling=Sampling(do_sample=True, **bad))
    for bad in (dict(max_new_tokens=-1), dict(max_new_tokens=2, prefill_chunk=0)):
        with pytest.raises(T2RError):
            decode(model, ids, mask, **bad)
    with pytest.raises(T2RError, match="attention_mask"):
        decode(model, ids, mask[:, 1:], max_new_tokens=2)


@pytest.mark.parametrize("which", ["converted", "original"])
def test_prefill_in_pieces_gives_the_same_tokens(which):
    model = _converted("llama-window-kept")
    model = original_model(model) if which == "original" else model
    ids, mask = _batch(length=13)
    whole, _ = decode(model, ids, mask, max_new_tokens=6)
    for chunk in (1, 4, 13, 50):
        pieces, cache = decode(model, ids, mask, max_new_tokens=6, prefill_chunk=chunk)
        assert torch.equal(pieces, whole), chunk
        assert cache.get_seq_length() == 13 + 5
