"""T5, mT5 and UMT5 converted to RNN decoders, on tiny random configs: only the decoder's self- and cross-attention
change (the encoder keeps its softmax and bias); the decoder is an RNN (full-sequence logits == prefill + token-by-token
decoding, the source state read once), also with blocks kept softmax (block 0's bias still reaches them); beam search
over the recurrent cache == beam search over the parallel form; padded sources == each alone; keep_softmax gives the
original back exactly; save -> load in a new process; AutoModelForSeq2SeqLM after `import t2r`; attention transfer
and training on pairs; `t2r convert` of a T5 directory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from test_cli import assert_usage_error, run_cli
from test_seq2seq import (
    REL,
    SOURCE_LEN,
    TARGET_LEN,
    batch,
    check_beam_search_recurrent_equals_parallel,
    check_steps_equal_full,
    rel,
)
from test_translation import PAIRS, check_transfer_trains_only_feature_maps, word_tokenizer
from transformers.cache_utils import EncoderDecoderCache

import t2r
from t2r.adapters import RecurrentLayer, adapter_for, original_model
from t2r.adapters.t5 import T5CrossAttention, T5DecoderSelfAttention
from t2r.attention import LinearAttention, is_conversion_parameter
from t2r.convert import convert, keep_softmax
from t2r.errors import UnsupportedModelError
from t2r.translation import PairTraining, train_pairs, translate

FAMILIES = ["t5", "mt5", "umt5"]
CLASSES = {"t5": ("T5Config", "T5ForConditionalGeneration"), "mt5": ("MT5Config", "MT5ForConditionalGeneration"),
           "umt5": ("UMT5Config", "UMT5ForConditionalGeneration")}
LAYERS = 3


def tiny_t5(family: str = "t5", seed: int = 0, vocab_size: int = 48):
    """3 encoder + 3 decoder blocks, 8 position buckets up to distance 16 (so the test lengths use several buckets).
    mT5 and UMT5 have a gated-GELU MLP and untied embeddings; UMT5 a bias in every block."""
    config_cls, model_cls = (getattr(transformers, name) for name in CLASSES[family])
    config = config_cls(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config).eval()


def converted(family: str = "t5", **recipe):
    return convert(tiny_t5(family), feature_map=recipe.pop("feature_map", "t2r"), feature_dim=16, **recipe).eval()


def self_attentions(model):
    return [block.layer[0].SelfAttention for block in model.decoder.block]


def cross_attentions(model):
    return [block.layer[1].EncDecAttention for block in model.decoder.block]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_decoder_attentions_change(family, caplog):
    original = tiny_t5(family)
    before = dict(original.named_parameters())
    encoder = [block.layer[0].SelfAttention for block in original.encoder.block]
    with caplog.at_level(logging.WARNING):
        model = convert(original, feature_map="t2r", feature_dim=16)
    assert type(model).__name__ == f"T2R{CLASSES[family][1]}"
    assert all(isinstance(m, T5DecoderSelfAttention) for m in self_attentions(model))
    assert all(isinstance(m, T5CrossAttention) for m in cross_attentions(model))
    assert [block.layer[0].SelfAttention for block in model.encoder.block] == encoder  # the same modules
    assert not any(isinstance(m, LinearAttention) for m in model.encoder.modules())
    after = dict(model.named_parameters())
    # every pretrained weight keeps its name and tensor, the relative bias tables included; what is new is feature maps
    assert {n for n in after if not is_conversion_parameter(n)} == set(before)
    assert all(after[n] is before[n] for n in before)
    assert any("decoder.block.0.layer.0.SelfAttention.relative_attention_bias" in n for n in after)
    new = [n for n in after if is_conversion_parameter(n)]
    assert new and all(".feature_map." in n and ".decoder.block." in f".{n}" for n in new)
    assert len(new) == 2 * LAYERS * len([n for n in new if ".block.0.layer.0." in n])  # self + cross, every block
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "relative position bias is dropped" in warnings[0] and "keep_softmax" in warnings[0]


@pytest.mark.parametrize("family", ["t5", "umt5"])
def test_original_model_and_keeping_every_layer_give_the_original_logits_exactly(family):
    src, mask, tgt = batch(pad=3)
    with torch.no_grad():
        expected = tiny_t5(family)(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        model = converted(family)
        rebuilt = original_model(model)(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert keep_softmax(model, range(LAYERS)) == list(range(LAYERS))
        restored = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        kept = converted(family, keep_softmax_layers=tuple(range(LAYERS)))
        never = kept(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert torch.equal(rebuilt, expected) and torch.equal(restored, expected) and torch.equal(never, expected)
    assert model.config.t2r["keep_softmax_layers"] == list(range(LAYERS))
    assert type(self_attentions(model)[0]).__name__ == CLASSES[family][1].replace("ForConditionalGeneration", "Attention")


@pytest.mark.parametrize("family", ["t5", "umt5"])
@pytest.mark.parametrize("kept", [(0,), (1,)])
def test_kept_blocks_compute_exactly_what_the_original_did(family, kept):
    """With block 0 kept softmax, the decoder's hidden state after it is the original's, bit for bit; with block 0
    converted and block 1 kept, block 1's softmax attention still gets block 0's relative bias (T5, mT5 hand it on)."""
    src, mask, tgt = batch(pad=3)
    original, model = tiny_t5(family), converted(family, keep_softmax_layers=kept)
    seen = {}
    for name, m in (("original", original), ("converted", model)):
        self_attentions(m)[1].register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: seen.__setitem__(name, kwargs.get("position_bias")), with_kwargs=True)
    with torch.no_grad():
        a = original(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_hidden_states=True)
        b = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_hidden_states=True)
    assert torch.equal(a.encoder_last_hidden_state, b.encoder_last_hidden_state)
    if kept == (0,):
        assert torch.equal(a.decoder_hidden_states[1], b.decoder_hidden_states[1])
    if family == "t5":
        assert seen["original"] is not None and torch.equal(seen["converted"], seen["original"])
        assert getattr(self_attentions(model)[0], "feeds_bias", None) is (True if kept == (1,) else None)
    else:  # UMT5: every block has its own bias, nothing is handed on
        assert seen["original"] is None and seen["converted"] is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kept", [(), (0,), (2,)])
@pytest.mark.parametrize("pad, left", [(0, False), (3, False), (4, True)])
def test_decoder_is_an_rnn(family, kept, pad, left):
    """Full-sequence logits (no cache) == a 3-token prefill then one token at a time, the source state read once;
    kept blocks decode from their KV cache (and their bias, handed on by a converted block 0, follows the steps)."""
    model = converted(family, keep_softmax_layers=kept)
    src, mask, tgt = batch(pad=pad, left=left, pad_id=0)
    with torch.no_grad():
        full = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, use_cache=False).logits
        encoded = model.get_encoder()(input_ids=src, attention_mask=mask)
        cache = EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
        logits = [model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tgt[:, :3], cache=cache).logits]
        cross = [layer.state for layer in cache.cross_attention_cache.layers if isinstance(layer, RecurrentLayer)]
        for t in range(3, TARGET_LEN):
            logits.append(model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tgt[:, t:t + 1],
                                cache=cache).logits)
    assert rel(torch.cat(logits, 1), full) < REL
    converted_layers = [i for i in range(LAYERS) if i not in kept]
    selfs, crosses = cache.self_attention_cache.layers, cache.cross_attention_cache.layers
    assert [i for i in range(LAYERS) if isinstance(selfs[i], RecurrentLayer)] == converted_layers
    assert all(a is crosses[i].state for a, i in zip(cross, converted_layers))  # read once
    assert [crosses[i].seen_tokens for i in converted_layers] == [SOURCE_LEN] * len(converted_layers)
    assert [selfs[i].seen_tokens for i in converted_layers] == [TARGET_LEN] * len(converted_layers)


@pytest.mark.parametrize("recipe", [dict(mixer="window", window=3), dict(mixer="gla"), dict(feature_map="hedgehog")])
def test_decoder_is_an_rnn_with_other_mixers_and_maps(recipe):
    model = converted("t5", **recipe)
    assert self_attentions(model)[0].recipe.mixer == recipe.get("mixer", "linear")
    assert cross_attentions(model)[0].recipe.mixer == "linear"
    check_steps_equal_full(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left", [False, True])
def test_padded_sources_equal_each_alone(family, left):
    """T5's encoder positions are relative, so a source padded on either side gives what it gives alone."""
    model = converted(family)
    src, mask, tgt = batch(pad=4, left=left, pad_id=0)
    alone_src = src[1:, 4:] if left else src[1:, :SOURCE_LEN - 4]
    with torch.no_grad():
        together = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        alone = model(input_ids=alone_src, decoder_input_ids=tgt[1:]).logits
        first = model(input_ids=src[:1], decoder_input_ids=tgt[:1]).logits
    assert rel(together[1:], alone) < REL and rel(together[:1], first) < REL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kept", [(), (1,)])
def test_beam_search_recurrent_equals_parallel(family, kept):
    model = converted(family, keep_softmax_layers=kept)
    src, mask, _ = batch(pad=3, pad_id=0)
    # the tiny random mT5 would pick the pad token every time
    check_beam_search_recurrent_equals_parallel(model, src, mask, suppress_tokens=[0])


def test_a_linear_encoder_is_refused_and_the_model_left_as_it_was():
    model = tiny_t5()
    with pytest.raises(UnsupportedModelError, match="a linear encoder is refused for T5.*bag of words"):
        convert(model, feature_map="t2r", encoder="linear")
    assert not hasattr(model.config, "t2r_encoder") and not hasattr(model.config, "t2r")
    assert not any(isinstance(m, LinearAttention) for m in model.modules())
    assert convert(model, feature_map="t2r", encoder="softmax").config.t2r_encoder == "softmax"


def test_transfer_reference_is_the_original_biased_attention():
    """What attention transfer imitates, for a block without a bias table of its own, is the original softmax
    attention with block 0's bias; cross-attention's is the original's over the real source tokens."""
    original, model = tiny_t5(), converted()
    torch.manual_seed(4)
    h, enc = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        bias = self_attentions(original)[0].compute_bias(7, 7)
        causal = torch.full((7, 7), float("-inf")).triu(1)
        expected, _, _ = self_attentions(original)[2](h, mask=causal[None, None], position_bias=bias)
        attn = self_attentions(model)[2]
        linear, reference = attn.transfer_pair(h)
        assert rel(attn.o(reference.flatten(2)), expected) < 1e-5 and linear.shape == reference.shape
        source_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2]).bool()
        additive = torch.zeros(2, 1, 7, 5).masked_fill(~source_mask[:, None, None, :], float("-inf"))
        expected, _, _ = cross_attentions(original)[1](h, mask=additive, key_value_states=enc)
        _, reference = cross_attentions(model)[1].transfer_pair(h, mask=additive, key_value_states=enc)
        assert rel(cross_attentions(model)[1].o(reference.flatten(2)), expected) < 1e-5


@pytest.mark.parametrize("family", ["t5", "umt5", "marian"])
def test_transfer_pair_takes_the_call_the_module_got(family):
    """Each converted attention's `transfer_pair(*args, **kwargs)`, given exactly what the model's forward handed the
    module (hidden states, mask, encoder states under the family's own keyword, cache, position bias), gives the linear
    output and the softmax reference, padded source tokens left out of both."""
    from test_seq2seq import tiny_seq2seq

    model = convert(tiny_seq2seq(family) if family == "marian" else tiny_t5(family), feature_map="t2r",
                    feature_dim=16).eval()
    modules = [m for m in model.modules() if hasattr(m, "transfer_pair")]
    calls = {}
    for m in modules:
        m.register_forward_pre_hook(lambda mod, args, kwargs: calls.__setitem__(mod, (args, kwargs)), with_kwargs=True)
    src, mask, tgt = batch(pad=4)
    with torch.no_grad():
        model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, use_cache=False)
        other = src.masked_fill(mask == 0, 7)  # other tokens where the source is padded
        pairs = {m: m.transfer_pair(*args, **kwargs) for m, (args, kwargs) in calls.items()}
        model(input_ids=other, attention_mask=mask, decoder_input_ids=tgt, use_cache=False)
        again = {m: m.transfer_pair(*args, **kwargs) for m, (args, kwargs) in calls.items()}
    assert len(pairs) == len(modules) == 2 * len(adapter_for(model).decoder_layers(model))  # self + cross
    for m, (linear, reference) in pairs.items():
        assert linear.shape == reference.shape and torch.isfinite(reference).all()
        assert rel(again[m][0], linear) < 1e-5 and rel(again[m][1], reference) < 1e-5


def test_attention_transfer_and_training_on_pairs():
    """transfer_attention trains only the feature maps and lowers its loss; train_pairs then teaches the pairs."""
    tokenizer = word_tokenizer()
    teacher = tiny_t5(vocab_size=len(tokenizer))
    student = convert(teacher, feature_map="t2r", feature_dim=16)
    check_transfer_trains_only_feature_maps(student, tokenizer, tokens=2000)
    summary = train_pairs(student, tokenizer, PAIRS, PairTraining(tokens=12000, batch_size=8, lr=3e-3))
    assert summary["final_loss"] < 1.0, summary
    assert translate(student, tokenizer, ["the file was saved"], beam=2) == ["die datei wurde gespeichert"]


def test_save_load_in_a_new_process_and_automodel(tmp_path):
    """One subprocess loads a converted T5 (with a kept block) and UMT5: AutoModelForSeq2SeqLM after `import t2r`
    and t2r.load, from safetensors, with the same logits."""
    src, mask, tgt = batch(pad=2, pad_id=0)
    cases = {}
    for family, kept in (("t5", (2,)), ("umt5", ())):
        model = converted(family, keep_softmax_layers=kept)
        with torch.no_grad():
            expected = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        t2r.save(model, tmp_path / family)
        assert (tmp_path / family / "model.safetensors").is_file() and not list((tmp_path / family).glob("*.bin"))
        torch.save(expected, tmp_path / f"{family}.pt")
        cases[family] = str(tmp_path / family)
    torch.save({"src": src, "mask": mask, "tgt": tgt}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import json, torch, transformers, t2r
        d = torch.load({str(tmp_path / 'inputs.pt')!r})
        out = {{}}
        for family, path in {cases!r}.items():
            expected = torch.load(path + ".pt")
            auto = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
            loaded = t2r.load(path)
            with torch.no_grad():
                a = auto(input_ids=d["src"], attention_mask=d["mask"], decoder_input_ids=d["tgt"]).logits
                b = loaded(input_ids=d["src"], attention_mask=d["mask"], decoder_input_ids=d["tgt"]).logits
            err = lambda x: ((x - expected).norm() / expected.norm()).item()
            out[family] = {{"cls": type(auto).__name__, "a": err(a), "b": err(b),
                           "kept": auto.config.t2r["keep_softmax_layers"]}}
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["t5"]["cls"] == "T2RT5ForConditionalGeneration" and result["t5"]["kept"] == [2]
    assert result["umt5"]["cls"] == "T2RUMT5ForConditionalGeneration"
    assert all(r["a"] < 1e-6 and r["b"] < 1e-6 for r in result.values()), result
    assert "relative position bias is dropped" not in done.stderr  # the warning is the conversion's, not a load's


def test_adapter_knows_the_families():
    for family in FAMILIES:
        adapter = adapter_for(tiny_t5(family))
        assert type(adapter).__name__ == "T5Adapter" and adapter.max_positions(tiny_t5(family).config) is None
        assert len(adapter.decoder_layers(tiny_t5(family))) == LAYERS


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    tokenizer = word_tokenizer()
    path = tmp_path_factory.mktemp("t5") / "plain"
    tiny_t5(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_converts_a_t5_directory_and_translates(t5_dir, tmp_path, capsys):
    out = tmp_path / "rnn"
    code, stdout, err = run_cli(capsys, "convert", t5_dir, "--feature-map", "t2r", "--feature-dim", "8", "--out", out,
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["linear_layers"] == 2 * LAYERS  # the decoder's self + cross
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "t2r_t5" and config["t2r"]["feature_map"] == "t2r"
    code, stdout, err = run_cli(capsys, "translate", out, "--src", "the file was saved", "--beam", "2", "--json")
    assert code == 0 and isinstance(json.loads(stdout)["translation"], str), err
    code, _, err = run_cli(capsys, "convert", t5_dir, "--encoder", "linear", "--out", tmp_path / "enc")
    assert_usage_error(code, err, "convert", "linear encoder is refused for T5", "keep the encoder softmax")
    assert not (tmp_path / "enc").exists()
