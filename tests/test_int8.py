"""`t2r.int8`: int8 linears with per-token activation scales and float32 outlier channels, against their slow twin
(the same arithmetic written out: per-channel int8 weights, each token rounded to 8 bits on its own grid, outlier
channels multiplied in float32), and the calibration that finds the outlier channels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import t2r
from conftest import tiny_model
from t2r.calibration import CALIBRATION_TEXT, calibration_ids
from t2r.int8 import OUTLIER_THRESHOLD, Int8Linear, find_outliers, full_range_activations
from t2r.quantize import pretrained_linear_names, quantize


def _linear(n_in=64, n_out=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def _slow_twin(module: Int8Linear, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Written out step by step: the module's own int8 weights, dequantized; the non-outlier channels of each token
    divided by that token's largest magnitude (when a call has several tokens), then all rounded on one grid
    between their min and max by PyTorch's own quantizer (7 bits, or 8 where the CPU has VNNI), multiplied by the
    weights in float and by the token's magnitude again; outlier channels and bias exact."""
    outliers = module.outliers
    wq = module.int8.weight().dequantize()  # (out, in), outlier columns zero
    rows = x.reshape(-1, x.shape[-1]).clone()  # (N, in)
    kept = rows[:, outliers].clone()
    rows[:, outliers] = 0
    scale = rows.abs().amax(1, keepdim=True) if rows.shape[0] > 1 else torch.ones(1, 1)  # (N, 1)
    rows = rows / scale
    rows = torch.quantize_per_tensor_dynamic(rows, torch.quint8, module.reduce_range).dequantize()  # one grid a call
    y = (rows @ wq.T) * scale + kept @ linear.weight.detach()[:, outliers].T
    if linear.bias is not None:
        y = y + linear.bias.detach()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 64)])
def test_int8_linear_matches_its_slow_twin(bias, shape):
    linear = _linear(bias=bias)
    outliers = torch.tensor([3, 17])
    x = torch.randn(*shape)
    x[..., outliers] *= 40  # activation outliers
    module = Int8Linear(linear, outliers)
    got, ref, exact = module(x), _slow_twin(module, linear, x), linear(x)
    # the same grid: equal up to float rounding, and far closer to each other than to float32
    assert (got - ref).abs().max() < 1e-3 * (ref - exact).abs().max() + 1e-5
    assert (got - exact).abs().max() / exact.abs().max() < 0.02


def test_per_token_scales_keep_a_small_token_next_to_a_large_one():
    """One activation grid per call (PyTorch's dynamic int8) rounds a small token on a large token's grid; with one
    scale per token the small token's error stays near what it is alone."""
    linear = _linear(bias=False)
    x = torch.randn(1, 2, 64)
    x[0, 0] *= 100  # a token 100x larger than its neighbour
    module = Int8Linear(linear)
    exact = linear(x)[0, 1]
    err_batch = (module(x)[0, 1] - exact).abs().max()
    err_alone = (module(x[:, 1:])[0, 0] - exact).abs().max()
    err_shared_grid = (module._int8(x)[0, 1] - exact).abs().max()
    assert err_batch < 3 * err_alone
    assert err_shared_grid > 10 * err_batch


def test_outlier_channels_are_exact_float32():
    """An input that is zero outside the outlier channels gives the float32 product exactly."""
    linear = _linear()
    outliers = torch.tensor([5, 9, 60])
    x = torch.zeros(3, 64)
    x[:, outliers] = torch.randn(3, 3) * 50
    assert torch.allclose(Int8Linear(linear, outliers)(x), linear(x), atol=1e-4)


def test_find_outliers_finds_a_planted_channel_and_quantize_keeps_it():
    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8).eval()
    names = pretrained_linear_names(model)
    target = sorted(n for n in names if n.endswith("mlp.down_proj"))[0]
    up = model.get_submodule(target.replace("down_proj", "up_proj"))
    with torch.no_grad():
        up.weight[11] *= 400  # channel 11 of the down projection's input becomes an outlier on any text
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    found = find_outliers(model, names, ids)
    assert 11 in found[target].tolist()
    assert model.training is False
    q = quantize(model, "int8", calibration=ids)
    assert 11 in q.get_submodule(target).outliers.tolist()


def test_outliers_save_perplexity_where_the_plain_kernel_loses_it():
    """A tiny model with one massive activation channel: the plain per-call int8 linear moves the logits far more than
    t2r's int8 (outliers float32, per-token scales)."""
    import warnings

    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8).eval()
    for name in pretrained_linear_names(model):
        if name.endswith("mlp.up_proj"):
            with torch.no_grad():
                model.get_submodule(name).weight[7] *= 300
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    names = pretrained_linear_names(model)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(plain, {n: torch.ao.quantization.per_channel_dynamic_qconfig
                                                       for n in names}, dtype=torch.qint8, inplace=True)
    ours = quantize(copy.deepcopy(model), "int8", calibration=ids[:1])
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        err_plain = (plain(input_ids=ids).logits - ref).abs().max()
        err_ours = (ours(input_ids=ids).logits - ref).abs().max()
    assert err_ours < 0.25 * err_plain


def test_calibration_text_through_a_tokenizer_and_the_fallback(tokenizer, caplog):
    ids = calibration_ids(tokenizer, max_tokens=64)
    assert ids.shape == (1, 64) and len(CALIBRATION_TEXT.split()) > 200
    model = t2r.convert(tiny_model("llama"), feature_map="elu").eval()
    with caplog.at_level("WARNING"):
        quantize(copy.deepcopy(model), "int8", tokenizer=tokenizer)
    assert "without calibration tokens" not in caplog.text
    with caplog.at_level("WARNING"):
        q = quantize(model, "int8")  # no tokens at all: still int8, no channel kept, and a warning saying so
    assert "without calibration tokens" in caplog.text
    assert all(m.outliers.numel() == 0 for m in q.modules() if isinstance(m, Int8Linear))
    assert OUTLIER_THRESHOLD == 6.0  # LLM.int8()'s; RESULTS' figures were measured with it


@pytest.mark.parametrize("reduce_range", [True, False])
def test_both_activation_ranges_match_the_twin(reduce_range, monkeypatch):
    """7-bit activations (any x86 CPU) and 8-bit ones (CPUs with VNNI) both follow the twin."""
    if not reduce_range and not full_range_activations():
        pytest.skip("8-bit activations are only used on CPUs with VNNI (others can saturate): not this one")
    linear = _linear()
    module = Int8Linear(linear, torch.tensor([1]))
    module.reduce_range = reduce_range
    x = torch.randn(3, 5, 64)
    got, ref = module(x), _slow_twin(module, linear, x)
    assert (got - ref).abs().max() < 1e-3 * (ref - linear(x)).abs().max() + 1e-5


def test_the_int8_step_compiles_without_graph_breaks_and_decodes_the_same_tokens():
    """torch.compile takes the int8 product as one custom op (t2r::int8_linear): the compiled one-token step has no
    graph break and decodes exactly eager int8's greedy tokens."""
    import torch._dynamo

    from t2r.decode import decode
    from t2r.step import compiled_decoder

    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8).eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    q = quantize(model, "int8", calibration=ids[:1])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    built = compiled_decoder(q)
    assert built.compiled, built.reason
    assert not torch._dynamo.utils.counters["graph_break"]
    eager, _ = decode(q, ids, max_new_tokens=8)
    compiled, _ = decode(built.model, ids, max_new_tokens=8)
    assert torch.equal(eager, compiled)


def test_the_compile_table_follows_the_modules_lifetime():
    """Each live Int8Linear has its own entry in the table the compiled op reads; a copy gets its own, and an entry
    goes when its module is collected (no weights kept for the process's life)."""
    import gc

    from t2r import int8

    module = Int8Linear(_linear())
    twin = copy.deepcopy(module)
    assert twin.key != module.key and {module.key, twin.key} <= set(int8._PACKED)
    x = torch.randn(2, 64)
    assert torch.equal(twin(x), module(x))
    key = module.key
    del module
    gc.collect()
    assert key not in int8._PACKED and twin.key in int8._PACKED
