"""Any dtype (issue 17): a converted model cast to bfloat16 / float16 after loading runs (feature maps compute in
float32, the recurrent state stays float32), saves and loads in its dtype, passes `verify` with the dtype's bound, and
every model-loading command takes --dtype."""

from __future__ import annotations

import json

import pytest
import torch

import t2r
import t2r.cli
from conftest import tiny_model
from t2r.ops.common import DeltaState, LinearState
from test_cli import run_cli

HALF = [torch.bfloat16, torch.float16]
MAPS = ["t2r", "hedgehog", "taylor", "elu", "relu", "rfa", "performer"]
MIXERS = [("linear", 0), ("window", 4), ("gla", 0), ("delta", 0), ("gated_delta", 4)]


def converted(feature_map="hedgehog", mixer="linear", window=0, family="llama"):
    dim = None if feature_map in ("elu", "relu") else 8
    return t2r.convert(tiny_model(family), feature_map=feature_map, feature_dim=dim, mixer=mixer, window=window,
                       keep_softmax_layers=(1,))


def states(cache) -> list:
    return [layer.state for layer in cache.layers if getattr(layer, "state", None) is not None]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("feature_map", MAPS)
def test_every_feature_map_runs_in_half_precision(feature_map, dtype):
    model = converted(feature_map).to(dtype)
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    fm = next(m for m in model.modules() if isinstance(m, t2r.feature_maps.FeatureMap))
    phi_q, _ = fm(torch.randn(1, 3, fm.num_heads, fm.head_dim, dtype=dtype), torch.randn(1, 3, fm.num_heads,
                                                                                         fm.head_dim, dtype=dtype))
    assert phi_q.dtype == torch.float32  # the map computes in float32


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mixer, window", MIXERS)
def test_recurrent_state_stays_float32(mixer, window, dtype):
    model = converted("hedgehog", mixer, window).to(dtype)
    ids = torch.randint(3, 250, (1, 10))
    cache = t2r.new_cache(model)
    with torch.no_grad():
        model(input_ids=ids[:, :9], cache=cache, use_cache=True)
        logits = model(input_ids=ids[:, 9:], cache=cache, use_cache=True).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    found = states(cache)
    assert found
    for state in found:
        recurrent = state.S if isinstance(state, (LinearState, DeltaState)) else state[0]  # S of every state kind
        assert recurrent.dtype == torch.float32, type(state).__name__


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_close_to_float32(dtype):
    """The cast model's logits stay near the float32 model's (what 16-bit weights cost, not a broken path)."""
    model = converted("hedgehog", "window", 4)
    ids = torch.randint(3, 250, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        low = model.to(dtype)(input_ids=ids).logits.float()
    assert ((low - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 5e-2


@pytest.mark.parametrize("dtype", HALF)
def test_save_load_round_trip_in_half_precision(tmp_path, tokenizer, dtype):
    model = converted("hedgehog", "window", 4).to(dtype)
    t2r.save(model, tmp_path / "m", tokenizer)
    again = t2r.load(tmp_path / "m", dtype=dtype)
    ids = torch.randint(3, 250, (1, 16))
    saved = dict(model.named_parameters())
    assert all(torch.equal(p, saved[n]) for n, p in again.named_parameters())  # the same 16-bit weights
    with torch.no_grad():  # close, not equal: `.to(dtype)` also rounds HF's rotary frequencies, a load does not
        a, b = model(input_ids=ids).logits.float(), again(input_ids=ids).logits.float()
    assert ((a - b).norm(dim=-1) / b.norm(dim=-1)).max() < 2e-2
    assert {p.dtype for n, p in again.named_parameters() if not t2r.attention.is_conversion_parameter(n)} == {dtype}
    up = t2r.load(tmp_path / "m")  # float32 by default
    assert {p.dtype for p in up.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_verify_passes_in_half_precision_with_a_bound_that_follows_the_dtype(family, dtype):
    model = converted("hedgehog", "window", 4, family=family).to(dtype)
    report = t2r.verify(model, tokens=40, prefill=23)
    assert report["ok"], report
    assert report["dtype"] == str(dtype).removeprefix("torch.")
    assert report["tolerance"] == max(3e-2, report["rounding_factor"] * report["dtype_rounding_error"])
    assert all(p.dtype == dtype for p in model.parameters())  # the model itself is left as it was



def test_cli_dtype(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "bf16"
    code, stdout, err = run_cli(capsys, "convert", tiny_model_dir, "--feature-map", "t2r", "--feature-dim", 8,
                                "--dtype", "bfloat16", "--out", out, "--json")
    assert code == 0, err
    assert {p.dtype for n, p in t2r.load(out, dtype=None).named_parameters() if "feature_map" not in n} == {
        torch.bfloat16}  # saved in bf16 (dtype=None: as stored); the new feature maps stay float32
    code, stdout, err = run_cli(capsys, "verify", out, "--tokens", 20, "--prefill", 7, "--dtype", "bfloat16", "--json")
    assert code == 0, err
    assert json.loads(stdout)["dtype"] == "bfloat16"
    code, stdout, err = run_cli(capsys, "verify", out, "--tokens", 20, "--prefill", 7, "--dtype", "bfloat16")
    assert code == 0 and "in bfloat16" in stdout.splitlines()[-1]
    code, stdout, err = run_cli(capsys, "eval", out, "--data", tmp_path / "none.txt", "--dtype", "float8")
    assert code == 2 and "--dtype is one of float32, bfloat16, float16" in err


def test_verify_says_when_a_dtype_is_too_coarse_for_the_model():
    from t2r.cli.render import render

    report = {"max_rel_err_recurrent_vs_full": 1.1, "dtype": "bfloat16", "dtype_rounding_error": 2.2,
              "rounding_factor": 2.0, "tolerance": 4.4, "dtype_too_coarse": True, "ok": True}
    text = render("verify", report)
    assert "bfloat16 is too coarse for it; use float32" in text
    assert "tolerance 4.4 = 2 x the bfloat16 rounding error 2.2 of this model" in text.splitlines()[-1]


def test_recall_in_bfloat16(capsys, tiny_converted_dir):
    code, stdout, err = run_cli(capsys, "recall", tiny_converted_dir, "--lengths", "256", "--depths", "0.5",
                                "--samples", 2, "--dtype", "bfloat16", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["dtype"] == "bfloat16" and r["student"]["cells"] and r["teacher"]["cells"]
    code, stdout, err = run_cli(capsys, "recall", tiny_converted_dir, "--dtype", "float8")
    assert code == 2 and "float32, bfloat16, float16" in err
