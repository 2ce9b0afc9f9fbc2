"""The recurrences that forget and overwrite: the `gla`, `delta` and `gated_delta` mixers (with and without a window)
agree with their quadratic twins in every mode, switch off only what an ablation names, start where they say, keep
the RNN claim end to end on tiny models of every family, generate through HF `generate()` with a fixed-size state and
left padding, train in stage 1, and save and load."""

from __future__ import annotations

import pytest
import torch

import t2r
from conftest import FAMILIES, tiny_model
from t2r.ablation import ablated
from t2r.adapters import RecurrentCache
from t2r.errors import RecipeError, T2RError
from t2r.mixers import MIXERS, DeltaMixer, GatedLinearMixer, LinearMixer, Mixer, WindowMixer, build_mixer
from t2r.recipe import Recipe
from t2r.transfer import AttentionTransfer, layer_errors

NEW = ("gla", "delta", "gated_delta")
CASES = [(name, window) for name in NEW for window in (0, 3)]
IDS = [f"{name}-w{window}" for name, window in CASES]
H, D, F = 3, 8, 5


def _inputs(B=2, T=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    phi_q, phi_k = (torch.rand(B, T, H, F, generator=g) for _ in range(2))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    return q, k, v, phi_q, phi_k, mask


def _stir(module: torch.nn.Module, seed: int = 1, std: float = 0.3) -> torch.nn.Module:
    """Give every mixer parameter a random offset: gates that depend on the token, window factors that differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mixer in (m for m in module.modules() if isinstance(m, Mixer)):
            for param in mixer.parameters():
                param.add_(std * torch.randn(param.shape, generator=g))
    return module


def _mixer(name, window, **options):
    recipe = Recipe(mixer=name, window=window, chunk_size=4, mixer_options=options)
    return _stir(build_mixer(recipe, num_heads=H, scale=0.3, head_dim=D, feature_dim=F))


def _twin(mixer, q, k, v, phi_q, phi_k):
    scores = 0.3 * torch.einsum("bthd,bshd->bhts", q, k)  # (B, H, T, T)
    w = mixer.weights(scores, phi_q, phi_k, v=v)
    if mixer.normalised:
        w = w / (w.sum(-1, keepdim=True) + mixer.eps)
    return torch.einsum("bhts,bshd->bthd", w, v)


def test_registry_and_recipe_checks():
    assert set(NEW) <= set(MIXERS.names())
    for name in NEW:
        assert Recipe(mixer=name).window == 0 and Recipe(mixer=name, window=8).mixer == name
    with pytest.raises(RecipeError, match="decay_init must be a number strictly between 0 and 1"):
        build_mixer(Recipe(mixer="gla", mixer_options={"decay_init": 1.0}), num_heads=2, scale=0.5, head_dim=4,
                    feature_dim=4)
    with pytest.raises(RecipeError, match="unknown option.*decay_init.*accepts: beta_init"):
        build_mixer(Recipe(mixer="delta", mixer_options={"decay_init": 0.9}), num_heads=2, scale=0.5, head_dim=4)


@pytest.mark.parametrize("name,window", CASES, ids=IDS)
def test_forward_equals_the_quadratic_twin_in_every_mode(name, window):
    q, k, v, phi_q, phi_k, _ = _inputs()
    mixer = _mixer(name, window)
    with torch.no_grad():
        twin = _twin(mixer, q, k, v, phi_q, phi_k)
        for mode in ("chunk", "recurrent", "quadratic"):
            o, _ = mixer(q, k, v, phi_q, phi_k, mode=mode)
            torch.testing.assert_close(o, twin, rtol=1e-5, atol=1e-5, msg=f"{name} window={window} {mode}")


@pytest.mark.parametrize("name,window", CASES, ids=IDS)
def test_left_padding_and_a_carried_state_change_nothing(name, window):
    """Row 1's padded keys add nothing (it equals its real tokens alone); prefill + decode steps + prefill equals one
    call."""
    q, k, v, phi_q, phi_k, mask = _inputs()
    mixer = _mixer(name, window)
    with torch.no_grad():
        o, _ = mixer(q, k, v, phi_q, phi_k, key_mask=mask)
        alone, _ = mixer(*(x[1:, 4:] for x in (q, k, v, phi_q, phi_k)))
        torch.testing.assert_close(o[1:, 4:], alone, rtol=1e-5, atol=1e-5)
        whole, _ = mixer(q, k, v, phi_q, phi_k)
        pieces, state = [], None
        for start, stop, mode in ((0, 9, "chunk"), (9, 10, "recurrent"), (10, 11, "recurrent"), (11, 21, "chunk")):
            part = (x[:, start:stop] for x in (q, k, v, phi_q, phi_k))
            o, state = mixer(*part, state=state, mode=mode, output_final_state=True)
            pieces.append(o)
        torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 3])
def test_ablations_switch_off_only_what_they_name(window):
    q, k, v, phi_q, phi_k, _ = _inputs()
    gla, gdelta = _mixer("gla", window), _mixer("gated_delta", window)
    with torch.no_grad():
        plain = gla.without("gate")
        assert isinstance(plain, WindowMixer if window else LinearMixer)
        if window:
            assert plain.window_logit is gla.window_logit  # shared, not copied
        o, _ = plain(q, k, v, phi_q, phi_k)
        ref = _mixer_without_gates(gla)(q, k, v, phi_q, phi_k)[0]
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        ungated = gdelta.without("gate")
        assert type(ungated) is DeltaMixer and ungated.beta is gdelta.beta
        o, _ = ungated(q, k, v, phi_q, phi_k)
        ref = _mixer_without_gates(gdelta)(q, k, v, phi_q, phi_k)[0]
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        if window:
            for mixer in (gla, gdelta):
                alone = mixer.without("window")
                assert alone.window == 0 and type(alone) is type(mixer)
                window_only = mixer.without("linear")
                soft = WindowMixer(num_heads=H, scale=0.3, window=window, chunk_size=4)
                soft.window_logit.fill_(1e4)
                torch.testing.assert_close(window_only(q, k, v, phi_q, phi_k)[0], soft(q, k, v, phi_q, phi_k)[0])
        else:
            with pytest.raises(T2RError, match="has no window part"):
                gla.without("window")
    with pytest.raises(T2RError, match="the delta mixer has no gate part"):
        _mixer("delta", window).without("gate")


def _mixer_without_gates(mixer):
    """The same mixer with every decay exactly 1 (gate bias +inf-like), built independently of `without`."""
    clone = build_mixer(Recipe(mixer=mixer.name, window=mixer.window, chunk_size=4), num_heads=H, scale=0.3,
                        head_dim=D, feature_dim=F)
    clone.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        clone.gate.weight.zero_()
        clone.gate.bias.fill_(200.0)  # logsigmoid(200) == 0 in float32
    return clone


def test_gla_starts_as_the_plain_linear_model():
    """Right after the swap every decay is decay_init (close to 1): with decay_init -> 1 the gla mixer is the linear
    mixer, and at the default 0.999 it is close to it over a short sequence."""
    q, k, v, phi_q, phi_k, _ = _inputs()
    linear, _ = LinearMixer(num_heads=H, scale=0.3, chunk_size=4)(q, k, v, phi_q, phi_k)
    for decay_init, tol in ((1 - 1e-7, 1e-5), (0.999, 2e-2)):
        gla = build_mixer(Recipe(mixer="gla", chunk_size=4, mixer_options={"decay_init": decay_init}),
                          num_heads=H, scale=0.3, head_dim=D, feature_dim=F)
        assert isinstance(gla, GatedLinearMixer)
        with torch.no_grad():
            o, _ = gla(q, k, v, phi_q, phi_k)
        torch.testing.assert_close(o, linear, rtol=tol, atol=tol)


def _converted(family, name, window, **overrides):
    model = t2r.convert(tiny_model(family, **overrides), feature_map="hedgehog", feature_dim=8, mixer=name,
                        window=window)
    return _stir(model, std=0.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,window", CASES, ids=IDS)
def test_the_rnn_claim_end_to_end(family, name, window):
    """Full forward == quadratic reference == chunked prefill + token-by-token decode, left padding included."""
    report = t2r.verify(_converted(family, name, window), tokens=80, prefill=37)
    assert report["ok"], report


@pytest.mark.parametrize("name,window", CASES, ids=IDS)
def test_generate_with_a_fixed_size_state_and_left_padding(name, window, tokenizer):
    model = _converted("llama", name, window, vocab_size=len(tokenizer))
    prompts = ["The cat sat", "Once upon a time, in a land far away", "Hi"]
    batch = t2r.generate(model, tokenizer, prompts, max_new_tokens=10)
    for i, prompt in enumerate(prompts):
        assert t2r.generate(model, tokenizer, prompt, max_new_tokens=10).texts[0] == batch.texts[i]
    short = t2r.generate(model, tokenizer, "a", max_new_tokens=4)
    long = t2r.generate(model, tokenizer, "a " * 60, max_new_tokens=30)
    assert short.state_bytes == long.state_bytes > 0
    enc = tokenizer(prompts[1], return_tensors="pt")
    cache = t2r.new_cache(model)
    out = model.generate(**enc, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert isinstance(cache, RecurrentCache)
    with torch.no_grad():
        logits = model(input_ids=out, use_cache=False).logits
    n = enc["input_ids"].shape[1]
    assert torch.equal(logits[0, n - 1:-1].argmax(-1), out[0, n:])


@pytest.mark.parametrize("name", NEW)
def test_stage_one_trains_the_gates(name):
    model = _converted("llama", name, 0)
    transfer = AttentionTransfer(model)
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    transfer(ids)["loss"].backward()
    gates = {n: p for n, p in model.named_parameters() if ".mixer." in n}
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.values()), list(gates)
    if name != "gla":
        with pytest.raises(T2RError, match="has no attention rows.*attn_ce 0"):
            AttentionTransfer(model, attn_ce=1.0)(ids)
    else:
        assert torch.isfinite(AttentionTransfer(model, attn_ce=1.0)(ids)["ce"])


@pytest.mark.parametrize("name,window", [("gla", 3), ("gated_delta", 0)])
def test_save_load_and_ablate_a_converted_model(name, window, tmp_path, tokenizer):
    model = _converted("llama", name, window, vocab_size=len(tokenizer))
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    t2r.save(model, tmp_path / "m", tokenizer)
    loaded = t2r.load(tmp_path / "m")
    assert loaded.config.t2r["mixer"] == name
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        with ablated(loaded, "gate"):
            changed = loaded(input_ids=ids).logits
        assert not torch.allclose(changed, expected)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)  # restored


@pytest.mark.parametrize("name", NEW)
def test_auto_softmax_layers_can_rank_every_mixer(name):
    """`keep_softmax: auto:N` ranks layers by their transfer error: defined for every mixer."""
    model = _converted("llama", name, 3)
    blocks = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    errors = layer_errors(model, blocks)
    assert len(errors) == model.config.num_hidden_layers and all(e > 0 and e == e for e in errors)
