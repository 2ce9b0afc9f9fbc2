"""t2r.evaluate: perplexity against a hand computation from the logits, context windows, lm-eval's rolling windows,
the `t2r eval` command (teacher row == the original model's own perplexity) and its errors. Tiny models, CPU."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import t2r
from conftest import tiny_model
from t2r import cli
from t2r.cli.evaluation import EvalOptions, parse_context
from t2r.cli.evaluation import eval_command as run_eval
from t2r.cli.render import render_eval
from t2r.data import DataError, prepare_data
from t2r.errors import T2RError
from t2r.evaluate import count_words, perplexity, predicted_bytes, rolling_windows, text_perplexity

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife.\n\nHowever little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n\n")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("T2R_CACHE", str(tmp_path / "t2r-cache"))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=259)


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(1)
    return torch.randint(3, 259, (3, 20))  # (N, T)


def hand_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """Total next-token NLL of each row on its own, straight from the logits."""
    logits = model(windows).logits  # (B, T, V)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    return float(nll), windows[:, 1:].numel()


def test_perplexity_is_exp_of_the_mean_cross_entropy(model, blocks):
    with torch.no_grad():
        nll, tokens = hand_nll(model, blocks)
    r = perplexity(model, blocks, batch_size=2)  # 2 + 1: a ragged last batch
    assert r["tokens"] == tokens == 3 * 19 and r["windows"] == 3 and r["context"] == 20
    assert r["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert "bits_per_byte" not in r


def test_context_cuts_blocks_into_disjoint_windows(model, blocks):
    with torch.no_grad():
        parts = [hand_nll(model, blocks[:, s:s + 8]) for s in (0, 8, 16)]  # 8 + 8 + 4 tokens
    nll, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
    r = perplexity(model, blocks, context=8, batch_size=4)
    assert r["tokens"] == tokens == 3 * (7 + 7 + 3) and r["windows"] == 9
    assert r["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_max_blocks_and_bits_per_byte(model, blocks):
    first = perplexity(model, blocks[:2])
    r = perplexity(model, blocks, max_blocks=2, byte_count=100)
    assert r["ppl"] == pytest.approx(first["ppl"], rel=1e-6) and r["tokens"] == 38
    assert r["bits_per_byte"] == pytest.approx(r["nll"] * r["tokens"] / math.log(2) / 100, rel=1e-9)


def test_predicted_bytes_counts_the_predicted_tokens(tokenizer):
    ids = torch.tensor([tokenizer.encode("abcdefghij" * 2)])  # one byte per token, (1, 20)
    assert predicted_bytes(tokenizer, ids) == 19
    assert predicted_bytes(tokenizer, ids, context=8) == 7 + 7 + 3


def test_rolling_windows_by_hand():
    # lm-eval, max_length 3: [BOS] predicts 10..12; 12 predicts 13..15; the last window refills its context
    assert rolling_windows(list(range(10, 17)), 1, 3) == [
        ([1, 10, 11, 12], 3), ([12, 13, 14, 15], 3), ([13, 14, 15, 16], 1)]
    assert rolling_windows([5], 1, 4) == [([1, 5], 1)]
    assert rolling_windows([], 1, 4) == []


@pytest.mark.parametrize("n, length", [(1, 4), (4, 4), (5, 4), (13, 4), (9, 1)])
def test_rolling_windows_score_every_token_once(n, length):
    tokens = list(range(100, 100 + n))
    scored = []
    for ids, k in rolling_windows(tokens, 1, length):
        assert len(ids) - 1 <= length and 1 <= k <= length
        scored += ids[-k:]
    assert scored == tokens


def test_text_perplexity_matches_the_logits(model, tokenizer):
    docs = TEXT.strip().split("\n\n")  # two paragraphs
    total = 0.0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(doc)])
            total += hand_nll(model, ids)[0]
    r = text_perplexity(model, tokenizer, docs, max_length=512)  # one window per document
    words = sum(len(d.split()) for d in docs)  # no leading/trailing whitespace here: same as lm-eval's count
    assert r["words"] == words == sum(count_words(d) for d in docs)
    assert r["word_perplexity"] == pytest.approx(math.exp(total / words), rel=1e-5)
    assert r["byte_perplexity"] == pytest.approx(math.exp(total / sum(len(d.encode()) for d in docs)), rel=1e-5)
    small = text_perplexity(model, tokenizer, docs, max_length=16, batch_size=3)  # many windows, batched
    assert small["tokens"] == r["tokens"] and small["word_perplexity"] != r["word_perplexity"]


def test_count_words_is_lm_evals_regex_split():
    assert count_words("a b\n\nc") == 3
    assert count_words(" a b ") == 4  # leading / trailing whitespace count as empty words, as in lm-eval


def write_text(tmp_path, copies: int = 12):
    path = tmp_path / "novel.txt"
    path.write_text(TEXT * copies, encoding="utf-8")  # ~3.6 kB: 7 blocks of 512 byte tokens
    return path


def test_eval_teacher_row_is_the_original_models_own_perplexity(tiny_converted_dir, tiny_model_dir, tmp_path):
    text = write_text(tmp_path)
    r = run_eval(str(tiny_converted_dir), data=str(text), context=64, options=EvalOptions(batch_size=3))
    assert r["split"] == "heldout" and r["blocks"] == 1 and r["block_size"] == 512
    assert r["student"]["tokens"] == r["teacher"]["tokens"] == 8 * 63
    assert r["ratio"] == pytest.approx(r["student"]["ppl"] / r["teacher"]["ppl"])
    assert 0 < r["student"]["bits_per_byte"] and 0 < r["teacher"]["bits_per_byte"]
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    heldout = prepare_data(str(text), tokenizer, block_size=512).heldout
    assert r["teacher"]["ppl"] == pytest.approx(perplexity(original, heldout, context=64)["ppl"], rel=1e-5)
    assert "original" in render_eval(r) and "converted" in render_eval(r)


def test_eval_with_an_explicit_teacher_model(tiny_converted_dir, tiny_model_dir, tmp_path):
    """After full finetuning the rebuilt original is no longer the teacher: --teacher-model names the source."""
    text = write_text(tmp_path)
    rebuilt = run_eval(str(tiny_converted_dir), data=str(text), context=64)
    explicit = run_eval(str(tiny_converted_dir), data=str(text), context=64, teacher_model=str(tiny_model_dir))
    assert explicit["teacher_model"] == str(tiny_model_dir)
    assert explicit["teacher"]["ppl"] == pytest.approx(rebuilt["teacher"]["ppl"], rel=1e-5)  # weights unchanged


def test_eval_train_split_no_teacher_and_max_blocks(tiny_converted_dir, tmp_path):
    r = run_eval(str(tiny_converted_dir), data=str(write_text(tmp_path)), split="train", context=256,
                 options=EvalOptions(max_blocks=2, teacher=False))
    assert r["blocks"] == 2 and r["student"]["tokens"] == 2 * 2 * 255
    assert "teacher" not in r and "ratio" not in r


def test_eval_text_mode_and_plain_model(tiny_model_dir, tmp_path):
    r = run_eval(str(tiny_model_dir), text=str(write_text(tmp_path, 2)), context=64)
    assert "student" not in r and r["documents"] == 1
    assert r["teacher"]["words"] == count_words(TEXT * 2) and r["teacher"]["word_perplexity"] > 1
    assert "word ppl" in render_eval(r)


@pytest.mark.parametrize("argv, message", [
    (["--split", "test"], "unknown split"),
    (["--context", "0"], "--context"),
    (["--context", "lots"], "--context"),
    (["--max-blocks", "0"], "--max-blocks"),
    (["--batch-size", "0"], "--batch-size"),
    (["--ablate", "mlp"], "unknown ablation 'mlp'"),
])
def test_eval_rejects_bad_options(tiny_converted_dir, capsys, argv, message):
    assert cli.main(["eval", str(tiny_converted_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_eval_rejects_missing_model_and_data(tiny_converted_dir, tmp_path):
    with pytest.raises(T2RError):
        run_eval(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="unknown data source"):
        run_eval(str(tiny_converted_dir), data=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(DataError, match="fewer than one block"):
        run_eval(str(tiny_converted_dir), data=str(short))


def test_perplexity_rejects_bad_blocks(model):
    with pytest.raises(T2RError, match="LongTensor"):
        perplexity(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(T2RError, match="context"):
        perplexity(model, torch.zeros(1, 8, dtype=torch.long), context=1)
    with pytest.raises(T2RError, match="no tokens"):
        perplexity(model, torch.zeros(1, 1, dtype=torch.long))


def test_eval_function_is_a_cli_command():
    parser = argparse.ArgumentParser()
    cli.app._add_command(parser.add_subparsers(dest="command"), run_eval)
    args = parser.parse_args(["eval", "runs/x", "--context", "64", "--no-teacher", "--max-blocks", "3"])
    assert (args.model, args.context, args.teacher, str(args.max_blocks), args.split) == ("runs/x", "64", False, "3",
                                                                                       "heldout")
    assert parse_context(args.context) == 64 and parse_context("16k") == 16384 and parse_context(512) == 512
    assert "loglikelihood_rolling" in parser._subparsers._group_actions[0].choices["eval"].format_help()


def test_cached_perplexity_remembers_and_notices_changes(blocks, tmp_path, monkeypatch):
    import t2r.evaluate as ev

    model = tiny_model("llama", vocab_size=259)  # its own: the weights change below
    calls = []
    real = ev.perplexity
    monkeypatch.setattr(ev, "perplexity", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    first = ev.cached_perplexity(model, blocks, context=8, batch_size=2, cache_dir=tmp_path)
    again = ev.cached_perplexity(model, blocks, context=8, batch_size=2, cache_dir=tmp_path)
    assert first == again and len(calls) == 1
    assert first["ppl"] == pytest.approx(real(model, blocks, context=8, batch_size=2)["ppl"], rel=1e-12)
    ev.cached_perplexity(model, blocks, context=4, batch_size=2, cache_dir=tmp_path)  # other settings
    ev.cached_perplexity(model, blocks[:1], context=8, batch_size=2, cache_dir=tmp_path)  # other tokens
    assert len(calls) == 3
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)  # other weights
    ev.cached_perplexity(model, blocks, context=8, batch_size=2, cache_dir=tmp_path)
    assert len(calls) == 4
    for entry in tmp_path.glob("*.json"):  # a damaged entry is recomputed, not trusted
        entry.write_text("{not json")
    assert ev.cached_perplexity(model, blocks, context=8, batch_size=2, cache_dir=tmp_path)["ppl"] > 0
    assert len(calls) == 5


def test_model_fingerprint_covers_the_recipe():
    from t2r.evaluate import model_fingerprint

    a = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8, window=0)
    b = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8, window=4)
    assert model_fingerprint(a) == model_fingerprint(t2r.convert(tiny_model("llama"), feature_map="hedgehog",
                                                                 feature_dim=8, window=0))
    assert model_fingerprint(a) != model_fingerprint(b)  # same weights, different forward


def test_model_fingerprint_covers_the_code_revision(monkeypatch):
    """A change of t2r's math (FORWARD_REVISION) must not reuse results remembered for the same weights."""
    import t2r.evaluate as ev

    model = t2r.convert(tiny_model("llama"), feature_map="hedgehog", feature_dim=8)
    before = ev.model_fingerprint(model)
    monkeypatch.setattr(ev, "FORWARD_REVISION", ev.FORWARD_REVISION + 1)
    assert ev.model_fingerprint(model) != before


def test_eval_positions_with_ablations_and_plot(tiny_converted_dir, tmp_path):
    pytest.importorskip("matplotlib")
    options = EvalOptions(positions=True, chunk=16, ablate="linear,window,softmax-layers", plot=str(tmp_path / "p.png"))
    r = run_eval(str(tiny_converted_dir), data=str(write_text(tmp_path, 4)), context=64, options=options)
    assert r["positions"] and r["documents"] >= 1 and r["context"] == 64
    for who in ("teacher", "student", *(r["ablations"][p] for p in ("linear", "window", "softmax-layers"))):
        result = r[who] if isinstance(who, str) else who
        assert [(b["start"], b["end"]) for b in result["buckets"]] == [(0, 64)] and result["stopped_at"] is None
    assert all(len(a["bucket_ratios"]) == 1 and a["bucket_ratios"][0] > 0 for a in r["ablations"].values())
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "position" in render_eval(r)


def test_eval_refuses_what_it_cannot_measure(tiny_converted_dir, tiny_model_dir, tmp_path, capsys):
    text = str(write_text(tmp_path, 4))
    for argv in ([str(tiny_converted_dir), "--data", text, "--context", "100k", "--positions"],
                 [str(tiny_model_dir), "--data", text, "--ablate", "window"]):
        assert cli.main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
        assert err.startswith("t2r eval: error:")
