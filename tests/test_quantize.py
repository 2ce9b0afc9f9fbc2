"""Int8 weights (`t2r.quantize`): the pretrained linears become int8, conversion parameters and the state stay
float32, and the quantized model's logits and greedy tokens stay close to float32's on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

import t2r
from conftest import tiny_model
from t2r.decode import decode
from t2r.errors import T2RError
from t2r.cli.models import SpeedSettings
from t2r.int8 import Int8Linear
from t2r.quantize import is_quantized, pretrained_linear_names, quantize

# int8 per-channel weights plus per-call int8 activations: a tiny random model's logits (|logit| ~ 1) move by a few
# hundredths; the tolerance is relative to the largest logit.
LOGIT_TOLERANCE = 0.1


FP16_TOLERANCE = 1e-3  # float16 weights, float32 activations and accumulation


def _pair(family="llama", mode="int8", **recipe):
    model = t2r.convert(tiny_model(family), **(recipe or dict(feature_map="hedgehog", feature_dim=8))).eval()
    return model, quantize(copy.deepcopy(model), mode)


@pytest.mark.parametrize("mode", ["int8", "fp16"])
@pytest.mark.parametrize("family,recipe", [("llama", dict(feature_map="hedgehog", feature_dim=8)),
                                           ("qwen2", dict(feature_map="elu")),
                                           ("llama", dict(feature_map="t2r", feature_dim=8, window=4))])
def test_logits_within_tolerance_and_state_float32(family, recipe, mode):
    model, q = _pair(family, mode, **recipe)
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = model(input_ids=ids).logits, q(input_ids=ids).logits  # (B, T, V)
        _, cache = decode(q, ids, max_new_tokens=3)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err < (LOGIT_TOLERANCE if mode == "int8" else FP16_TOLERANCE)
    assert all(t.dtype in (torch.float32, torch.bool) for layer in cache.layers for t in layer.state)


@pytest.mark.parametrize("mode", ["int8", "fp16"])
def test_greedy_tokens_agree_wherever_the_margin_exceeds_the_logit_error(mode):
    """Along float32's greedy continuation (teacher-forced), the quantized model picks the same token at every step
    where float32's top-1 leads its top-2 by more than twice the largest logit change (a random tiny model has many
    near ties); with fp16 weights that is nearly every step."""
    model, q = _pair(mode=mode)
    ids = torch.randint(3, 300, (4, 9), generator=torch.Generator().manual_seed(1))
    tokens, _ = decode(model, ids, max_new_tokens=8)
    full = torch.cat([ids, tokens], 1)
    with torch.inference_mode():
        ref, got = (m(input_ids=full).logits[:, ids.shape[1] - 1:-1] for m in (model, q))  # (B, 8, V)
    assert torch.equal(ref.argmax(-1), tokens)
    top2 = ref.topk(2, dim=-1).values  # (B, 8, 2)
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (got - ref).abs().amax(-1)  # (B, 8)
    assert clear.sum() >= 8
    assert torch.equal(got.argmax(-1)[clear], tokens[clear])
    if mode == "fp16":
        assert torch.equal(got.argmax(-1), tokens)


def test_only_pretrained_linears_are_quantized():
    model, q = _pair()
    names = pretrained_linear_names(model)
    assert "lm_head" in names and any(n.endswith("self_attn.q_proj") for n in names)
    assert not any(".feature_map." in n for n in names)
    assert is_quantized(q) and not is_quantized(model)
    assert all(isinstance(q.get_submodule(n), Int8Linear) for n in names)
    feature_params = [p for n, p in q.named_parameters() if ".feature_map." in n]
    assert feature_params and all(p.dtype == torch.float32 for p in feature_params)
    assert q.config.t2r_quantize == "int8"


def test_none_is_a_no_op_and_bad_modes_fail_in_one_line():
    model = t2r.convert(tiny_model("llama"), feature_map="elu")
    assert quantize(model, "none") is model and not is_quantized(model)
    with pytest.raises(T2RError, match="--quantize is one of none, int8"):
        quantize(model, "int4")
    with pytest.raises(T2RError, match="float32"):
        quantize(copy.deepcopy(model).to(torch.bfloat16), "fp16")
    with pytest.raises(T2RError, match="float32"):
        quantize(copy.deepcopy(model).to(torch.bfloat16), "int8")


def test_generate_command_with_int8(tiny_converted_dir):
    from t2r.cli.models import generate_command

    out = generate_command(str(tiny_converted_dir), prompt="abc", max_new_tokens=4,
                           speed=SpeedSettings(quantize="int8"))
    assert out["quantize"] == "int8" and out["new_tokens"] == 4 and isinstance(out["text"], str)


def test_cli_flags(tiny_converted_dir, capsys, tmp_path, tokenizer):
    import json

    import t2r.cli

    code = t2r.cli.main(["-q", "generate", str(tiny_converted_dir), "--prompt", "abc", "--max-new-tokens", "3",
                         "--quantize", "fp16", "--compile", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["quantize"] == "fp16" and out["new_tokens"] == 3
    # PyTorch's fp16 linears do not compile: --compile falls back to eager decoding and says why
    assert out["compiled"] is False and "fp16" in out["compile_fallback"]
    from t2r.step import compile_unavailable

    assert "fp16" in compile_unavailable(_pair(mode="fp16")[1])
    assert compile_unavailable(_pair(mode="int8")[1]) == ""  # t2r's int8 linear compiles (test_int8.py)
    linear = tmp_path / "all-linear"  # (the fixture keeps a softmax layer, which the fixed-state step cannot hold)
    t2r.save(t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8), linear, tokenizer)
    code = t2r.cli.main(["-q", "generate", str(linear), "--prompt", "abc", "--max-new-tokens", "3",
                         "--quantize", "int8", "--compile", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["quantize"] == "int8" and out["new_tokens"] == 3
    assert out["compiled"] is True, out.get("compile_fallback")
    code = t2r.cli.main(["generate", str(tiny_converted_dir), "--quantize", "int4"])
    assert code == 2 and "--quantize: is one of none, int8" in capsys.readouterr().err
