"""Mixers are registry entries like feature maps: named in the recipe (`Recipe.mixer`), recorded in `config.t2r`,
each with a quadratic twin (`weights`) that its fast forward agrees with; models saved before mixers existed load."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import t2r
from conftest import tiny_model
from t2r.errors import RecipeError
from t2r.mixers import MIXERS, LinearMixer, WindowMixer, build_mixer
from t2r.ops import linear_attention, sliding_window_linear_attention
from t2r.recipe import Recipe


def test_registry_lists_the_mixers_and_refuses_unknown_names():
    assert {"linear", "window"} <= set(MIXERS.names())
    with pytest.raises(RecipeError, match="unknown mixer 'gated'; known: .*linear, window"):
        Recipe(mixer="gated")
    with pytest.raises(RecipeError, match="unknown mixer"):
        t2r.convert(tiny_model("llama"), feature_map="elu", mixer="gated")


def test_recipe_mixer_defaults_and_checks():
    assert Recipe().mixer == "linear" and Recipe(window=4).mixer == "window"
    with pytest.raises(RecipeError, match="linear mixer has no softmax window"):
        Recipe(mixer="linear", window=4)
    with pytest.raises(RecipeError, match="window mixer needs window >= 1"):
        Recipe(mixer="window")
    with pytest.raises(RecipeError, match="unknown option.*colour"):
        build_mixer(Recipe(mixer_options={"colour": 1}), num_heads=2, scale=0.5)
    saved = Recipe(window=4).to_dict()
    assert saved["mixer"] == "window" and saved["version"] == 2
    old = {k: v for k, v in saved.items() if k not in ("mixer", "mixer_options")} | {"version": 1}
    assert Recipe.from_dict(old) == Recipe(window=4)  # a version-1 recipe means what it meant


def _inputs(B=2, T=19, H=3, D=8, F=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    phi_q, phi_k = (torch.rand(B, T, H, F, generator=g) for _ in range(2))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    return q, k, v, phi_q, phi_k, mask


@pytest.mark.parametrize("recipe", [Recipe(chunk_size=4), Recipe(window=3, chunk_size=4)], ids=["linear", "window"])
def test_mixer_forward_equals_its_quadratic_twin(recipe):
    """`weights` (the twin attention transfer uses) normalised and applied to v is the mixer's output."""
    q, k, v, phi_q, phi_k, _ = _inputs()
    mixer = build_mixer(recipe, num_heads=3, scale=0.3)
    with torch.no_grad():
        if isinstance(mixer, WindowMixer):
            mixer.window_logit.copy_(torch.tensor([-1.0, 0.0, 2.0]))
        scores = 0.3 * torch.einsum("bthd,bshd->bhts", q, k)  # (B, H, T, T)
        w = mixer.weights(scores, phi_q, phi_k)
        twin = torch.einsum("bhts,bshd->bthd", w / (w.sum(-1, keepdim=True) + recipe.eps), v)
        for mode in ("chunk", "recurrent", "quadratic"):
            o, _ = mixer(q, k, v, phi_q, phi_k, mode=mode)
            torch.testing.assert_close(o, twin, rtol=1e-5, atol=1e-5)


def test_mixers_call_their_ops_with_key_masks():
    q, k, v, phi_q, phi_k, mask = _inputs()
    linear = LinearMixer(num_heads=3, scale=0.3, chunk_size=4)
    o, state = linear(q, k, v, phi_q, phi_k, key_mask=mask, output_final_state=True)
    ref, ref_state = linear_attention(phi_q, phi_k, v, key_mask=mask, chunk_size=4, output_final_state=True)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(state.S, ref_state.S)
    # padded keys add nothing: the padded row's state equals that of its real tokens alone
    alone, alone_state = linear_attention(phi_q[1:, 4:], phi_k[1:, 4:], v[1:, 4:], output_final_state=True)
    torch.testing.assert_close(state.S[1:], alone_state.S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o[1:, 4:], alone, rtol=1e-5, atol=1e-5)
    window = WindowMixer(num_heads=3, scale=0.3, window=3, chunk_size=4)
    o, _ = window(q, k, v, phi_q, phi_k, key_mask=mask)
    ref, _ = sliding_window_linear_attention(q, k, v, phi_q, phi_k, window=3, window_factor=window.factor(),
                                             scale=0.3, key_mask=mask, chunk_size=4)
    torch.testing.assert_close(o, ref)


def _as_saved_before_mixers(path) -> None:
    """Rewrite a saved model the way t2r wrote it before mixers were modules: window factors at `...window_logit`,
    a version-1 recipe without `mixer`."""
    weights = path / "model.safetensors"
    tensors = {k.replace(".mixer.window_logit", ".window_logit"): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["t2r"] = {k: v for k, v in config["t2r"].items() if k not in ("mixer", "mixer_options")} | {"version": 1}
    (path / "config.json").write_text(json.dumps(config))


def test_a_model_saved_before_mixers_loads_with_its_window_factors(tmp_path, tokenizer):
    model = t2r.convert(tiny_model("llama"), feature_map="t2r", feature_dim=8, window=4)
    with torch.no_grad():
        for i, param in enumerate(p for n, p in model.named_parameters() if n.endswith("window_logit")):
            param.copy_(torch.linspace(-1, 1, param.numel()) * (i + 1))  # not the initial zeros
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    t2r.save(model, tmp_path / "old", tokenizer)
    _as_saved_before_mixers(tmp_path / "old")
    assert any(k.endswith("self_attn.window_logit") for k in load_file(str(tmp_path / "old" / "model.safetensors")))
    for loaded in (t2r.load(tmp_path / "old"),
                   transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()):
        assert loaded.config.t2r["mixer"] == "window"
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
