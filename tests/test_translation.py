"""The translation commands on a tiny random Marian model with a word-level tokenizer: `t2r convert` of a Marian
directory, `t2r translate`, `t2r eval --bleu` (sacrebleu), `t2r finetune` on sentence pairs (also with --kd), `t2r distill` on
sentence pairs (attention transfer); the errors: --bleu on a
decoder-only model, a source longer than the encoder's positions (truncated with a warning)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from t2r.cli import main
from t2r.errors import T2RError
from t2r.convert import convert
from t2r.translation import (
    PairTraining,
    bleu_chrf,
    check_translation_model,
    encode_pairs,
    encode_sources,
    pad_id_of,
    pair_kd_loss,
    pair_loss,
    train_pairs,
    transfer_attention,
    translate,
)

WORDS = "the file could not be opened saved closed a window was new old die datei konnte nicht geöffnet werden " \
        "gespeichert geschlossen ein fenster wurde neu alt"
PAIRS = [("the file could not be opened", "die datei konnte nicht geöffnet werden"),
         ("the file was saved", "die datei wurde gespeichert"),
         ("a window was closed", "ein fenster wurde geschlossen"),
         ("the new window", "die neu fenster"),
         ("the old file", "die alt datei")] * 8


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *dict.fromkeys(WORDS.split())])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_marian(vocab_size: int, positions: int = 24, seed: int = 0):
    config = transformers.MarianConfig(
        vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=positions,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None, init_std=0.1)
    torch.manual_seed(seed)
    return transformers.MarianMTModel(config).eval()


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    tokenizer = word_tokenizer()
    path = tmp_path_factory.mktemp("marian") / "plain"
    tiny_marian(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    (root / "a.en").write_text("".join(s + "\n" for s, _ in PAIRS), encoding="utf-8")
    (root / "b.de").write_text("".join(t + "\n" for _, t in PAIRS), encoding="utf-8")
    assert main(["-q", "data", f"parallel:{root / 'a.en'},{root / 'b.de'}", "--out", str(root / "out")]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def converted_dir(marian_dir):
    out = marian_dir.parent / "rnn"
    assert main(["-q", "convert", str(marian_dir), "--feature-map", "t2r", "--feature-dim", "8", "--out", str(out)]) == 0
    return out


def test_convert_a_marian_directory(converted_dir):
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "t2r_marian" and config["t2r"]["feature_map"] == "t2r"


def test_convert_with_a_linear_encoder(marian_dir, tmp_path, capsys):
    out = tmp_path / "enc"
    assert main(["convert", str(marian_dir), "--feature-map", "elu", "--encoder", "linear", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["linear_layers"] == 1 + 2 * 2  # the encoder's one layer, the decoder's self + cross
    assert json.loads((out / "config.json").read_text())["t2r_encoder"] == "linear"


def test_translate_command(converted_dir, capsys):
    assert main(["translate", str(converted_dir), "--src", "the file was saved", "--beam", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["converted"] and result["beam"] == 3 and isinstance(result["translation"], str)
    assert main(["translate", str(converted_dir), "--src", "the file was saved", "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    assert main(["translate", str(converted_dir), "--src", "x", "--dtype", "float8"]) == 2
    assert "float32, bfloat16, float16" in capsys.readouterr().err


def test_translate_matches_library_and_beam_1_is_greedy(converted_dir):
    from t2r.cli.models import load_any
    model, tokenizer = load_any(str(converted_dir), translation=True)
    src = ["the file was saved", "a window"]
    beam1 = translate(model, tokenizer, src, beam=1, max_new_tokens=6)
    ids = [tokenizer(s, return_tensors="pt") for s in src]
    greedy = [tokenizer.decode(model.generate(**x, do_sample=False, num_beams=1, max_new_tokens=6)[0],
                               skip_special_tokens=True).strip() for x in ids]
    assert beam1 == greedy


def test_long_source_is_truncated_with_a_warning(converted_dir, caplog):
    from t2r.cli.models import load_any
    model, tokenizer = load_any(str(converted_dir), translation=True)
    long_text = " ".join(["the file"] * 30)  # 61 tokens > 24 positions
    with caplog.at_level(logging.WARNING):
        ids = encode_sources(tokenizer, [long_text, "the file"], 24)
        out = translate(model, tokenizer, [long_text], beam=2, max_new_tokens=4)
    assert [len(x) for x in ids] == [24, 3] and ids[0][-1] == tokenizer.eos_token_id
    assert "1 source(s) longer than the encoder's 24 positions were truncated" in caplog.text
    assert len(out) == 1


def test_eval_bleu(converted_dir, pairs_dir, capsys):
    assert main(["eval", str(converted_dir), "--data", str(pairs_dir), "--split", "heldout", "--bleu", "--beam", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sentences"] >= 1
    for name in ("teacher", "student"):
        assert 0 <= result[name]["bleu"] <= 100 and 0 <= result[name]["chrf"] <= 100
        assert "tok:13a" in result[name]["signature"]["bleu"]
    assert main(["eval", str(converted_dir), "--data", str(pairs_dir), "--bleu", "--no-teacher"]) == 0
    assert "converted" in capsys.readouterr().out


def test_bleu_and_chrf_values():
    scores = bleu_chrf(["die datei wurde gespeichert heute"], ["die datei wurde gespeichert heute"])
    assert scores["bleu"] == 100.0 and scores["chrf"] == 100.0
    assert bleu_chrf(["ganz anders"], ["die datei wurde gespeichert heute"])["bleu"] < 10


def test_bleu_on_a_decoder_only_model_explains(tiny_converted_dir, pairs_dir, capsys):
    assert main(["eval", str(tiny_converted_dir), "--data", str(pairs_dir), "--bleu"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "weights" not in ln]  # not HF bars
    assert len(err) == 1 and err[0].startswith("t2r eval: error:") and "encoder-decoder" in err[0]
    assert "decoder-only" in err[0]
    with pytest.raises(T2RError, match="decoder-only"):
        check_translation_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)))


def test_finetune_on_pairs(converted_dir, pairs_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(converted_dir), "--data", str(pairs_dir), "--tokens", "2k", "--batch-size", "8",
                 "--lr", "3e-3", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target_tokens"] >= 2000 and result["heldout_loss_after"] < result["heldout_loss_before"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "t2r_marian"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == result["steps"]
    assert main(["finetune", str(converted_dir), "--data", str(pairs_dir), "--lora", "4", "--out",
                 str(tmp_path / "x")]) == 2


def test_training_learns_the_pairs():
    tokenizer = word_tokenizer()
    model = tiny_marian(len(tokenizer))
    train_pairs(model, tokenizer, PAIRS, PairTraining(tokens=12000, batch_size=8, lr=3e-3, seed=0))
    assert translate(model, tokenizer, ["the file was saved"], beam=2) == ["die datei wurde gespeichert"]


def test_attention_transfer_trains_only_feature_maps_and_lowers_its_loss():
    tokenizer = word_tokenizer()
    teacher = tiny_marian(len(tokenizer))
    train_pairs(teacher, tokenizer, PAIRS, PairTraining(tokens=4000, batch_size=8, lr=3e-3))
    check_transfer_trains_only_feature_maps(convert(teacher, feature_map="t2r", feature_dim=16), tokenizer, tokens=3000)


def check_transfer_trains_only_feature_maps(student, tokenizer, tokens: int) -> None:
    """transfer_attention on PAIRS changes only feature maps, lowers its loss, and leaves requires_grad as it was."""
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    losses = []
    transfer_attention(student, tokenizer, PAIRS, PairTraining(tokens=tokens, batch_size=8, lr=1e-2),
                       on_step=lambda step, loss, seen: losses.append(loss))
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".feature_map." in n for n in changed), sorted(changed)[:5]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert {n for n, p in student.named_parameters() if p.requires_grad} == trainable  # as they were


@pytest.mark.parametrize("argv", [["verify"], ["generate"], ["eval", "--max-blocks", "1"], ["bench"], ["recall"],
                                  ["distill", "--tokens", "1k", "--out", "OUT"], ["finetune", "--out", "OUT"]])
def test_language_model_commands_refuse_a_translation_model(converted_dir, tmp_path, capsys, argv):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main([argv[0], str(converted_dir), *argv[1:]]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "weights" not in ln]
    assert len(err) == 1 and "translation (encoder-decoder) model" in err[0] and "t2r translate" in err[0]


def test_kd_loss_against_a_token_by_token_twin():
    tokenizer = word_tokenizer()
    student, teacher = tiny_marian(len(tokenizer), seed=0), tiny_marian(len(tokenizer), seed=1)
    batch = encode_pairs(tokenizer, PAIRS[:5], 32)
    pad = pad_id_of(student, tokenizer)
    ce, n = pair_loss(student, batch, pad)
    loss, n_kd = pair_kd_loss(student, teacher, batch, pad, kd=0.7)
    assert n_kd == n == sum(len(t) for _, t in batch)
    kls = []  # one sentence at a time, F.kl_div per target token
    for src, tgt in batch:
        inputs = {"input_ids": torch.tensor([src]), "labels": torch.tensor([tgt]), "use_cache": False}
        s, t = student(**inputs).logits[0], teacher(**inputs).logits[0]
        for i in range(len(tgt)):
            kls.append(torch.nn.functional.kl_div(s[i].log_softmax(-1), t[i].log_softmax(-1), log_target=True,
                                                  reduction="sum"))
    torch.testing.assert_close(loss, ce + 0.7 * torch.stack(kls).mean(), rtol=1e-5, atol=1e-6)
    same, _ = pair_kd_loss(student, student, batch, pad, kd=3.0)  # no divergence from itself
    torch.testing.assert_close(same, ce, rtol=1e-5, atol=1e-6)


def test_kd_training_moves_the_student_toward_its_teacher():
    tokenizer = word_tokenizer()
    teacher = tiny_marian(len(tokenizer))
    train_pairs(teacher, tokenizer, PAIRS, PairTraining(tokens=4000, batch_size=8, lr=3e-3))
    batch, pad = encode_pairs(tokenizer, PAIRS[:5], 32), 0

    def divergence(model):
        with torch.no_grad():
            return float(pair_kd_loss(model, teacher, batch, pad, kd=1.0)[0] - pair_loss(model, batch, pad)[0])

    converted = convert(copy.deepcopy(teacher), feature_map="t2r", feature_dim=8)  # convert works in place
    plain, distilled = copy.deepcopy(converted), copy.deepcopy(converted)
    train_pairs(plain, tokenizer, PAIRS, PairTraining(tokens=3000, batch_size=8, lr=3e-3))
    summary = train_pairs(distilled, tokenizer, PAIRS, PairTraining(tokens=3000, batch_size=8, lr=3e-3, kd=5.0),
                          teacher=teacher)
    assert summary["kd"] == 5.0
    assert divergence(distilled) < divergence(converted) and divergence(distilled) < divergence(plain) / 2
    student = distilled
    with pytest.raises(T2RError, match="needs a teacher"):
        train_pairs(student, tokenizer, PAIRS, PairTraining(tokens=100, kd=1.0))


def test_finetune_on_pairs_with_kd_from_the_original(converted_dir, marian_dir, pairs_dir, tmp_path, capsys):
    out = tmp_path / "kd"
    assert main(["finetune", str(converted_dir), "--data", str(pairs_dir), "--tokens", "1k", "--batch-size", "8",
                 "--lr", "3e-3", "--kd", "0.5", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kd"] == 0.5 and result["teacher"] is None and result["target_tokens"] >= 1000
    assert main(["-q", "finetune", str(converted_dir), "--data", str(pairs_dir), "--tokens", "1k", "--kd", "0.5",
                 "--teacher", str(marian_dir), "--out", str(tmp_path / "kd2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["teacher"] == str(marian_dir)


@pytest.mark.parametrize("args, message", [
    (["--teacher", "MARIAN"], "add --kd"),
    (["--kd-top-k", "8", "--kd", "1"], "--kd-top-k"),
    (["--kd", "1", "PLAIN"], "name one with --teacher"),
])
def test_finetune_on_pairs_refuses_bad_kd_settings(converted_dir, marian_dir, pairs_dir, tmp_path, capsys, args,
                                                   message):
    model = marian_dir if "PLAIN" in args else converted_dir
    args = [str(marian_dir) if a == "MARIAN" else a for a in args if a != "PLAIN"]
    assert main(["-q", "finetune", str(model), "--data", str(pairs_dir), "--tokens", "1k", *args, "--out",
                 str(tmp_path / "x")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "weights" not in ln]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x" / "config.json").exists()


def test_distill_on_pairs_trains_only_the_feature_maps(converted_dir, marian_dir, pairs_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "transfer"
    assert main(["distill", str(converted_dir), "--data", str(pairs_dir), "--tokens", "2k", "--batch-size", "8",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == "distill" and result["target_tokens"] >= 2000
    losses = [json.loads(line)["transfer_mse"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == result["steps"] and sum(losses[-2:]) < sum(losses[:2])
    before, after = load_file(converted_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".feature_map." in k for k in changed), sorted(changed)[:4]
    assert main(["-q", "distill", str(marian_dir), "--data", str(pairs_dir), "--tokens", "1k", "--out",
                 str(tmp_path / "y")]) == 2
    assert "converted translation model" in capsys.readouterr().err
