"""Conversion on tiny random models of every supported family: only attention changes, the RNN forms agree,
the recipe is recorded, bad recipes and unsupported models fail clearly."""

from __future__ import annotations

import pytest
import torch
import transformers

import t2r
from conftest import FAMILIES, tiny_model
from t2r.attention import LinearAttention
from t2r.errors import RecipeError, T2RError, UnsupportedModelError
from t2r.feature_maps import FeatureMapError

RECIPES = {
    "hedgehog": dict(feature_map="hedgehog", feature_dim=16),
    "t2r-window-kept": dict(feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,)),
    "elu-wide-window": dict(feature_map="elu", window=70),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_changes_only_attention(family):
    model = tiny_model(family)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    t2r.convert(model, feature_map="t2r", feature_dim=8, keep_softmax_layers=(2,))
    after = model.state_dict()
    for name, (value, ptr) in before.items():
        assert torch.equal(after[name], value), name
        assert after[name].data_ptr() == ptr, f"{name} was copied, not reused"
    added = set(after) - set(before)
    assert added and all(".feature_map." in k for k in added)
    assert not any(".layers.2." in k or ".h.2." in k for k in added), "kept softmax layer was converted"
    assert sum(isinstance(m, LinearAttention) for m in model.modules()) == 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", RECIPES, ids=list(RECIPES))
def test_rnn_forms_agree(family, recipe):
    """Full forward == quadratic reference == chunked prefill + token-by-token decode, with left padding."""
    model = t2r.convert(tiny_model(family), **RECIPES[recipe])
    report = t2r.verify(model, tokens=80, prefill=37)
    assert report["ok"], report
    for key in ("max_rel_err_chunk_vs_quadratic", "max_rel_err_recurrent_vs_full", "max_rel_err_padded_vs_alone"):
        assert report[key] < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_converted_is_same_hf_class_with_recipe(family):
    model = tiny_model(family)
    base_cls = type(model)
    t2r.convert(model, feature_map="hedgehog", feature_dim=16, window=8)
    assert isinstance(model, base_cls)
    assert model.config.model_type == f"t2r_{family}"
    recipe = model.config.t2r
    assert recipe["feature_map"] == "hedgehog" and recipe["feature_dim"] == 16 and recipe["window"] == 8
    assert t2r.Recipe.from_dict(recipe).window == 8


def test_convert_leaves_shared_config_alone():
    config = tiny_model("llama").config
    a = transformers.LlamaForCausalLM(config)
    t2r.convert(a)
    assert config.model_type == "llama" and not hasattr(config, "t2r")
    t2r.convert(transformers.LlamaForCausalLM(config))  # a second model from the same config converts too


def test_default_recipe_records_map_default_dim():
    model = t2r.convert(tiny_model("llama"))
    assert model.config.t2r["feature_map"] == "hedgehog" and model.config.t2r["feature_dim"] == 64


def test_feature_maps_train():
    """Gradients reach the feature maps and the window factors through the chunked form."""
    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8, window=4).train()
    ids = torch.randint(0, 300, (2, 40))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".feature_map." in name or name.endswith("window_logit"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_convert_twice_fails():
    model = t2r.convert(tiny_model("llama"))
    with pytest.raises(T2RError, match="already converted"):
        t2r.convert(model)


def test_unsupported_architecture_names_supported():
    config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                    vocab_size=100, word_embed_proj_dim=32)
    with pytest.raises(UnsupportedModelError) as err:
        t2r.convert(transformers.OPTForCausalLM(config))
    for name in ("llama", "mistral", "qwen2", "gpt2"):
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(feature_map="nope"), FeatureMapError, "known: elu"),
    (dict(feature_dim=0), RecipeError, "positive"),
    (dict(feature_dim=-3), RecipeError, "positive"),
    (dict(window=-1), RecipeError, "window"),
    (dict(keep_softmax_layers=(7,)), RecipeError, "out of range"),
])
def test_bad_recipes(kwargs, error, words):
    model = tiny_model("llama")
    with pytest.raises(error, match=words):
        t2r.convert(model, **kwargs)
    assert not any(isinstance(m, LinearAttention) for m in model.modules()), "a failed convert left changes"


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_softmax_after_conversion(family, tmp_path):
    """Layers can go back to softmax later (auto layer choice); all of them back == the original model."""
    from t2r.convert import keep_softmax

    ids = torch.randint(0, 300, (2, 40))
    reference = tiny_model(family)(ids).logits
    model = t2r.convert(tiny_model(family), feature_map="t2r", feature_dim=8, window=4)
    assert keep_softmax(model, [0, 2]) == [0, 2]
    assert model.config.t2r["keep_softmax_layers"] == [0, 2]
    assert t2r.verify(model, tokens=40, prefill=20)["ok"]
    t2r.save(model, tmp_path / "m")
    assert t2r.load(tmp_path / "m").config.t2r["keep_softmax_layers"] == [0, 2]
    keep_softmax(model, [1])
    assert torch.equal(model(ids).logits, reference)
    with pytest.raises(RecipeError, match="out of range"):
        keep_softmax(model, [9])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reinitialize_draws_fresh_weights(family):
    from t2r.convert import reinitialize

    model = tiny_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reinitialize(model, seed=3)
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            assert not torch.equal(param, before[name]), name
            assert abs(param.std().item() - std) < 0.5 * std, name
        elif name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        else:
            assert torch.all(param == 1), name
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    again = reinitialize(tiny_model(family), seed=3)  # seeded: reproducible
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    converted = t2r.convert(model, feature_map="t2r", feature_dim=8)
    with pytest.raises(t2r.T2RError, match="before converting"):
        reinitialize(converted)


def test_the_convert_settings_and_the_recipe_agree():
    """`t2r convert`'s flags (and a pipeline recipe's `convert:`) are the Recipe's fields with the Recipe's defaults."""
    from dataclasses import fields

    from t2r.stages.recipes import ConvertSettings

    recipe_fields = {f.name for f in fields(t2r.Recipe)}
    assert recipe_fields <= set(ConvertSettings.model_fields)
    assert ConvertSettings().recipe() == t2r.Recipe()
    assert ConvertSettings(window=8, keep_softmax_layers="0,2").recipe() == t2r.Recipe(window=8,
                                                                                       keep_softmax_layers=(0, 2))
