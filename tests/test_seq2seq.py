"""Encoder-decoder models (Marian, BART) converted to RNN decoders, on tiny random configs: only the intended
attentions change; the decoder is an RNN (full-sequence logits == prefill + token-by-token decoding with the source
state read once); beam search over the recurrent cache == beam search over the parallel form; padded sources == each
alone; save -> load in a new process; AutoModelForSeq2SeqLM after `import t2r`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers.cache_utils import EncoderDecoderCache

import t2r
from t2r.adapters import RecurrentLayer, adapter_for, original_model
from t2r.adapters.seq2seq import CrossLinearAttention, DecoderSelfLinearAttention, EncoderLinearAttention
from t2r.attention import is_conversion_parameter
from t2r.convert import convert, keep_softmax
from t2r.errors import T2RError, UnsupportedModelError
from t2r.sources import load_model

REL = 1e-4
SOURCE_LEN, TARGET_LEN = 11, 9


def tiny_seq2seq(family: str, seed: int = 0):
    """A 2+2-layer model whose weights are large enough (std 0.3) that the source changes the output."""
    common = dict(vocab_size=48, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40,
                  init_std=0.3, forced_eos_token_id=None)
    if family == "marian":
        config = transformers.MarianConfig(**common, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        cls = transformers.MarianMTModel
    else:
        config = transformers.BartConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                         decoder_start_token_id=2, forced_bos_token_id=None)
        cls = transformers.BartForConditionalGeneration
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls(config).eval()


def converted(family: str, encoder: str = "softmax", **recipe):
    return convert(tiny_seq2seq(family), feature_map=recipe.pop("feature_map", "t2r"), feature_dim=16,
                   encoder=encoder, **recipe).eval()


def batch(seed: int = 1, pad: int = 0, left: bool = False, pad_id: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 48, (2, SOURCE_LEN), generator=g)
    mask = torch.ones_like(src)
    if pad:
        cols = slice(0, pad) if left else slice(SOURCE_LEN - pad, SOURCE_LEN)
        src[1, cols], mask[1, cols] = pad_id, 0
    tgt = torch.randint(3, 48, (2, TARGET_LEN), generator=g)
    return src, mask, tgt


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


FAMILIES = ["marian", "bart"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoder", ["softmax", "linear"])
def test_only_the_intended_attentions_change(family, encoder):
    original = tiny_seq2seq(family)
    before = {name: p for name, p in original.named_parameters()}
    model = convert(original, feature_map="t2r", feature_dim=16, encoder=encoder)
    assert type(model).__name__.startswith("T2R") and isinstance(model, type(tiny_seq2seq(family)))
    for layer in model.model.decoder.layers:
        assert isinstance(layer.self_attn, DecoderSelfLinearAttention)
        assert isinstance(layer.encoder_attn, CrossLinearAttention)
    for layer in model.model.encoder.layers:
        assert isinstance(layer.self_attn, EncoderLinearAttention) == (encoder == "linear")
    after = dict(model.named_parameters())
    # every pretrained weight is the same tensor; what is new is feature maps only
    assert {n for n in after if not is_conversion_parameter(n)} == set(before)
    assert all(after[n] is before[n] for n in before)
    assert all(".feature_map." in n for n in after if is_conversion_parameter(n))
    assert model.config.t2r["feature_map"] == "t2r" and model.config.t2r_encoder == encoder


@pytest.mark.parametrize("family", FAMILIES)
def test_original_model_gives_the_unconverted_logits(family):
    src, mask, tgt = batch()
    reference = tiny_seq2seq(family)
    with torch.no_grad():
        expected = reference(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        rebuilt = original_model(converted(family))(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert rel(rebuilt, expected) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoder", ["softmax", "linear"])
@pytest.mark.parametrize("pad, left", [(0, False), (3, False), (4, True)])
def test_decoder_is_an_rnn(family, encoder, pad, left):
    """Full-sequence logits (no cache) == a 3-token prefill then one token at a time, the source state read once."""
    model = converted(family, encoder)
    src, mask, tgt = batch(pad=pad, left=left, pad_id=model.config.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, use_cache=False).logits
        encoded = model.get_encoder()(input_ids=src, attention_mask=mask)
        cache = EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
        logits = [model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tgt[:, :3], cache=cache).logits]
        cross = [layer.state for layer in cache.cross_attention_cache.layers]
        for t in range(3, TARGET_LEN):
            logits.append(model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tgt[:, t:t + 1],
                                cache=cache).logits)
    assert rel(torch.cat(logits, 1), full) < REL
    assert all(isinstance(layer, RecurrentLayer) for layer in cache.self_attention_cache.layers)
    assert all(a is layer.state for a, layer in zip(cross, cache.cross_attention_cache.layers))  # read once
    assert [layer.seen_tokens for layer in cache.cross_attention_cache.layers] == [SOURCE_LEN] * 2
    assert [layer.seen_tokens for layer in cache.self_attention_cache.layers] == [TARGET_LEN] * 2


@pytest.mark.parametrize("recipe", [dict(mixer="window", window=3), dict(mixer="gla"), dict(feature_map="hedgehog")])
def test_decoder_is_an_rnn_with_other_mixers_and_maps(recipe):
    """The decoder self-attention takes the recipe's mixer (cross-attention stays plain linear)."""
    model = converted("marian", **recipe)
    assert model.model.decoder.layers[0].self_attn.recipe.mixer == recipe.get("mixer", "linear")
    assert model.model.decoder.layers[0].encoder_attn.recipe.mixer == "linear"
    check_steps_equal_full(model)


def check_steps_equal_full(model) -> None:
    """Full-sequence decoder logits == one decoder token at a time with the cache (padded sources)."""
    src, mask, tgt = batch(pad=3)
    with torch.no_grad():
        full = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, use_cache=False).logits
        cache = EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
        steps = [model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt[:, t:t + 1], cache=cache).logits
                 for t in range(TARGET_LEN)]
    assert rel(torch.cat(steps, 1), full) < REL


def test_cross_attention_equals_its_quadratic_twin():
    """phi(q)^T S / phi(q)^T z == the normalised matrix of phi(q_t) . phi(k_j) over the real source tokens."""
    model = converted("marian")
    attn = model.model.decoder.layers[0].encoder_attn
    torch.manual_seed(3)
    h, enc = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        out, _ = attn(h, key_value_states=enc, attention_mask=mask[:, None, None, :].expand(2, 1, 5, 7))
        q, k, v = (attn.heads(p, x) for p, x in ((attn.q_proj, h), (attn.k_proj, enc), (attn.v_proj, enc)))
        phi_q, phi_k = attn.feature_map(q, k)  # (B, T, H, F), (B, S, H, F)
        a = torch.einsum("bthf,bshf->bhts", phi_q, phi_k) * mask[:, None, None, :]  # (B, H, T, S)
        o = torch.einsum("bhts,bshd->bthd", a / a.sum(-1, keepdim=True), v)
        expected = attn.out_proj(o.flatten(2))
    assert rel(out, expected) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoder", ["softmax", "linear"])
def test_right_padded_sources_equal_each_alone(family, encoder):
    model = converted(family, encoder)
    src, mask, tgt = batch(pad=4, pad_id=model.config.pad_token_id)
    with torch.no_grad():
        together = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        alone = model(input_ids=src[1:, :SOURCE_LEN - 4], decoder_input_ids=tgt[1:]).logits
    assert rel(together[1:], alone) < REL
    assert rel(together[:1], model(input_ids=src[:1], decoder_input_ids=tgt[:1]).logits) < REL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("encoder", ["softmax", "linear"])
@pytest.mark.parametrize("left", [False, True])
def test_padded_keys_are_left_out(family, encoder, left):
    """Whatever the padded positions hold, the real tokens' outputs stay the same (left padding shifts the
    positions of Marian and BART, softmax or not, so "alone" is compared on right padding above)."""
    model = converted(family, encoder)
    src, mask, tgt = batch(pad=4, left=left, pad_id=model.config.pad_token_id)
    other = src.clone()
    other[mask == 0] = torch.randint(3, 48, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        b = model(input_ids=other, attention_mask=mask, decoder_input_ids=tgt).logits
    assert rel(b, a) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_recurrent_equals_parallel(family):
    model = converted(family)
    src, mask, _ = batch(pad=3, pad_id=model.config.pad_token_id)
    check_beam_search_recurrent_equals_parallel(model, src, mask)


def check_beam_search_recurrent_equals_parallel(model, src, mask, **extra):
    """generate() with the recurrent cache (states reordered with the beams) == generate() recomputing the parallel
    form over the whole prefix at every step (no cache); `extra`: more generate() arguments."""
    kwargs = dict(input_ids=src, attention_mask=mask, num_beams=4, num_return_sequences=2, max_new_tokens=10,
                  do_sample=False, output_scores=True, return_dict_in_generate=True, min_new_tokens=10, **extra)
    with torch.no_grad():
        cached = model.generate(**kwargs, use_cache=True)
        parallel = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached.sequences, parallel.sequences)
    assert rel(cached.sequences_scores, parallel.sequences_scores) < REL
    assert not torch.equal(cached.sequences[0], cached.sequences[2])  # the two sources give different outputs


def test_beam_search_reorders_the_states():
    """Greedy per beam would differ from beam search: the states are reordered, not left in place."""
    model = converted("marian")
    src, mask, _ = batch()
    cache = EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with torch.no_grad():
        model(input_ids=src, attention_mask=mask, decoder_input_ids=torch.zeros(2, 2, dtype=torch.long), cache=cache)
    before = [layer.state.S.clone() for layer in cache.self_attention_cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    after = [layer.state.S for layer in cache.self_attention_cache.layers]
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(after, before))
    cross = cache.cross_attention_cache.layers[0].state.S
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.cross_attention_cache.layers[0].state.S[0], cross[1])


def test_keep_softmax_layers_restores_both_attentions():
    model = converted("marian", keep_softmax_layers=(1,))
    layers = model.model.decoder.layers
    assert not isinstance(layers[1].self_attn, DecoderSelfLinearAttention)
    assert not isinstance(layers[1].encoder_attn, CrossLinearAttention)
    src, mask, tgt = batch()
    with torch.no_grad():  # a mixed model is still an RNN where it is linear, a KV cache where it is not
        full = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, use_cache=False).logits
        cached = model.generate(input_ids=src, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                do_sample=False)
        free = model.generate(input_ids=src, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, use_cache=False)
    assert torch.isfinite(full).all() and torch.equal(cached, free)
    model = converted("marian")
    assert keep_softmax(model, [0]) == [0]
    assert model.config.t2r["keep_softmax_layers"] == [0]
    assert type(model.model.decoder.layers[0].encoder_attn).__name__ == "MarianAttention"


def test_encoder_option_is_for_encoder_decoders_only():
    with pytest.raises(T2RError, match="softmax or linear"):
        convert(tiny_seq2seq("marian"), feature_map="t2r", encoder="fast")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30))
    with pytest.raises(T2RError, match="has no encoder"):
        convert(gpt2, feature_map="t2r", encoder="linear")


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_in_a_new_process_and_automodel(family, tmp_path):
    model = converted(family, "linear")
    src, mask, tgt = batch(pad=2, pad_id=model.config.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    t2r.save(model, tmp_path / "m")
    torch.save({"src": src, "mask": mask, "tgt": tgt, "expected": expected}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import json, torch, transformers, t2r
        d = torch.load({str(tmp_path / 'inputs.pt')!r})
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path / 'm')!r}).eval()
        loaded = t2r.load({str(tmp_path / 'm')!r})
        with torch.no_grad():
            a = model(input_ids=d["src"], attention_mask=d["mask"], decoder_input_ids=d["tgt"]).logits
            b = loaded(input_ids=d["src"], attention_mask=d["mask"], decoder_input_ids=d["tgt"]).logits
        err = lambda x: ((x - d["expected"]).norm() / d["expected"].norm()).item()
        print(json.dumps({{"cls": type(model).__name__, "a": err(a), "b": err(b),
                          "encoder": model.config.t2r_encoder}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cls"].startswith("T2R") and result["encoder"] == "linear"
    assert result["a"] < 1e-6 and result["b"] < 1e-6


def test_adapter_knows_the_families():
    for family in FAMILIES:
        adapter = adapter_for(tiny_seq2seq(family))
        assert adapter.max_positions(tiny_seq2seq(family).config) == 40


def test_t5_relatives_without_an_adapter_are_refused_with_their_reason(tmp_path):
    """T5, mT5 and UMT5 convert (tests/test_t5.py); LongT5 and Switch Transformers, whose blocks differ, are refused
    from config.json alone, before any weights load, saying why."""
    config = transformers.LongT5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(UnsupportedModelError, match="'longt5'.*transient-global.*convert a T5, mT5 or UMT5"):
        adapter_for(transformers.LongT5ForConditionalGeneration(config))
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'longt5'.*t5 adapter"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "switch_transformers"}))
    with pytest.raises(UnsupportedModelError, match="'switch_transformers'.*mixture-of-experts"):
        load_model(str(tmp_path))
