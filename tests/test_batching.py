"""Continuous batching (`t2r.batching.serve`): rows of mixed prompt lengths and budgets join and leave one batch,
and each row gets exactly the greedy tokens it gets decoded alone."""

from __future__ import annotations

import pytest
import torch

import t2r
from conftest import tiny_model
from t2r.batching import cache_step, serve
from t2r.decode import decode
from t2r.errors import T2RError

RECIPES = {"llama-hedgehog": ("llama", dict(feature_map="hedgehog", feature_dim=8)),
           "llama-window": ("llama", dict(feature_map="t2r", feature_dim=8, window=4)),
           "gpt2-elu": ("gpt2", dict(feature_map="elu"))}  # no explicit-state step: through the model's forward


def _prompts(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (n,), generator=g).tolist()
    return [torch.randint(3, 300, (length,), generator=g) for length in lengths]


def _alone(model, prompt, n, eos=None):
    tokens, _ = decode(model, prompt[None], max_new_tokens=n, eos_token_id=eos)
    row = tokens[0].tolist()
    return row[:row.index(eos) + 1] if eos is not None and eos in row else row


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_row_gets_its_tokens_alone(name):
    family, recipe = RECIPES[name]
    model = t2r.convert(tiny_model(family), **recipe).eval()
    prompts = _prompts()
    budgets = [5, 1, 9, 3, 12, 0, 7]
    sizes = []
    out = serve(model, prompts, max_new_tokens=budgets, max_batch=3, prefill_chunk=4, on_step=sizes.append)
    for prompt, n, got in zip(prompts, budgets, out):
        assert got.tolist() == _alone(model, prompt, n) if n else got.numel() == 0
    assert max(sizes) == 3 and min(sizes) < 3  # rows joined and left; never more than max_batch at once


def test_rows_leave_at_eos():
    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8).eval()
    prompts = _prompts(5, seed=1)
    free = [_alone(model, p, 10) for p in prompts]
    eos = free[0][3]  # a token row 0 emits: it stops there, others may too
    out = serve(model, prompts, max_new_tokens=10, max_batch=4, eos_token_id=eos)
    for prompt, got in zip(prompts, out):
        assert got.tolist() == _alone(model, prompt, 10, eos)
    assert len(out[0]) <= 4


def test_cache_step_matches_the_state_step():
    from t2r.step import StateStep, flatten_states, state_layout

    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8).eval()
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        cache = t2r.new_cache(model)
        model(input_ids=ids, cache=cache, use_cache=True)
        layout, state = state_layout(cache), flatten_states(cache)
        args = (ids[:, -1:], torch.full((2, 1), 6), *state)
        for a, b in zip(cache_step(model, layout)(*args), StateStep(model, layout)(*args)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments_fail_in_one_line():
    model = t2r.convert(tiny_model("llama"), feature_map="elu").eval()
    with pytest.raises(T2RError, match="max_batch"):
        serve(model, _prompts(2), max_new_tokens=2, max_batch=0)
    with pytest.raises(T2RError, match="one per prompt"):
        serve(model, _prompts(2), max_new_tokens=[1, 2, 3])
    kept = t2r.convert(tiny_model("llama"), feature_map="elu", keep_softmax_layers=(1,)).eval()
    with pytest.raises(T2RError, match="every layer is linear"):
        serve(kept, _prompts(2), max_new_tokens=2)
