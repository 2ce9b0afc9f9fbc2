"""The Python API's surprises removed (issue 17): `convert` in place by default and on a copy with inplace=False,
`verify` in eval mode and the caller's mode restored, `save` errors in the API's words, `drop_dequantized_quantizer`
public."""

from __future__ import annotations

import types

import pytest
import torch

import t2r
from conftest import tiny_model

RECIPE = dict(feature_map="t2r", feature_dim=8, window=4)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_convert_in_place_by_default():
    model = tiny_model("llama")
    assert t2r.convert(model, **RECIPE) is model
    assert "t2r" in model.config.to_dict()


def test_convert_a_copy_with_inplace_false():
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 12))
    before = logits(model, ids)
    converted = t2r.convert(model, inplace=False, **RECIPE)
    assert converted is not model
    assert "t2r" in converted.config.to_dict() and "t2r" not in model.config.to_dict()
    assert torch.equal(logits(model, ids), before)  # the original is untouched
    reference = t2r.convert(tiny_model("llama"), **RECIPE)  # the same conversion done in place
    assert torch.equal(logits(converted, ids), logits(reference, ids))


def test_verify_runs_in_eval_mode_and_restores_the_mode():
    """GPT-2 with dropout, left in train mode: dropout would make the forms differ; verify switches it off."""
    model = t2r.convert(tiny_model("gpt2", resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3), **RECIPE)
    model.train()
    report = t2r.verify(model, tokens=30, prefill=11)
    assert report["ok"], report
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    t2r.verify(model, tokens=30, prefill=11)
    assert not model.training


def test_save_error_in_api_words(tmp_path, tokenizer):
    model = t2r.convert(tiny_model("llama"), **RECIPE)
    t2r.save(model, tmp_path / "m", tokenizer)
    with pytest.raises(t2r.T2RError, match="overwrite=True") as err:
        t2r.save(model, tmp_path / "m", tokenizer)
    assert "--out" not in str(err.value)
    t2r.save(model, tmp_path / "m", tokenizer, overwrite=True)


def test_drop_dequantized_quantizer_is_public():
    model = tiny_model("llama")
    assert t2r.drop_dequantized_quantizer(model) is model  # nothing to drop
    model.hf_quantizer = types.SimpleNamespace()  # what a GGUF load leaves once its weights are dequantized
    model.config.quantization_config = {"quant_method": "gguf"}
    t2r.drop_dequantized_quantizer(model)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    assert "drop_dequantized_quantizer" in t2r.__all__
