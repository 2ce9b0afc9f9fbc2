"""Stage 2, finetuning: full and LoRA lower the LM loss, the LoRA export is a plain t2r model with the merged
weights, KD adds its KL term, resume is exact, bad inputs raise, and the CLI function runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

import t2r
from conftest import tiny_model
from t2r.cli.render import render_finetune
from t2r.cli.training import finetune_command
from t2r.data import TokenBlocks
from t2r.errors import T2RError
from t2r.stages.finetune import Finetuning, LanguageModeling, finetune_model
from t2r.train import FinetuneSettings, SettingsError, TrainConfig


def converted(tokenizer, family="llama"):
    return t2r.convert(tiny_model(family, vocab_size=len(tokenizer)), feature_map="hedgehog", feature_dim=8,
                       window=4 if family == "llama" else 0)


def blocks() -> TokenBlocks:
    g = torch.Generator().manual_seed(0)
    # a small alphabet: something a tiny model can learn in a few steps
    return TokenBlocks(torch.randint(3, 30, (8, 32), generator=g), torch.randint(3, 30, (2, 32), generator=g), {})


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(lr=3e-3, steps=10, batch_size=2, warmup=0, eval_every=0, eval_blocks=2,
                                 checkpoint_every=4, progress=False), **kw})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_finetuning_lowers_the_lm_loss(tmp_path, tokenizer, family):
    summary = finetune_model(converted(tokenizer, family), blocks(), tmp_path / "full", config(), tokenizer=tokenizer)
    assert summary["eval_after"]["nll"] < summary["eval_before"]["nll"] - 0.5
    assert t2r.load(tmp_path / "full").config.t2r["feature_map"] == "hedgehog"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_lowers_the_loss_and_exports_the_merged_model(tmp_path, tokenizer, family):
    model = converted(tokenizer, family)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ids = blocks().heldout
    seen = {}

    def before_export(step, record):
        if step == 10:
            with torch.no_grad():
                seen["logits"] = model(ids).logits  # base + unmerged adapters (peft injected them in place)

    summary = finetune_model(model, blocks(), tmp_path / "lora", config(lr=1e-2), tokenizer=tokenizer,
                             method=Finetuning(lora=4), on_step=before_export)
    assert summary["eval_after"]["nll"] < summary["eval_before"]["nll"] - 0.1
    loaded = t2r.load(tmp_path / "lora")
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, seen["logits"], rtol=1e-4, atol=1e-4)
    state = loaded.state_dict()
    attn = "self_attn.q_proj" if family == "llama" else "attn.c_attn"
    changed = {k for k in start if not torch.equal(state[k], start[k])}
    assert any(attn in k for k in changed) and any(".feature_map." in k for k in changed)
    assert not any("mlp" in k or "embed" in k or "wte" in k for k in changed)  # only adapted modules moved


def test_kd_adds_a_kl_term(tmp_path, tokenizer):
    model = converted(tokenizer)
    outputs = LanguageModeling(model, teacher=t2r.adapters.original_model(model), kd=0.5)(blocks().train[:2])
    assert outputs["kl"] > 0
    torch.testing.assert_close(outputs["loss"], outputs["lm_loss"] + 0.5 * outputs["kl"])
    summary = finetune_model(converted(tokenizer), blocks(), tmp_path / "kd", config(steps=4), tokenizer=tokenizer,
                             method=Finetuning(lora=2, kd=1.0))
    record = json.loads((tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()[1])
    assert record["kind"] == "train" and record["kl"] >= 0 and summary["steps"] == 4


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_equals_uninterrupted(tmp_path, tokenizer, lora):
    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 5:
            raise Crash

    method = Finetuning(lora=lora, kd=0.5)
    finetune_model(converted(tokenizer), blocks(), tmp_path / "a", config(), tokenizer=tokenizer, method=method)
    with pytest.raises(Crash):
        finetune_model(converted(tokenizer), blocks(), tmp_path / "b", config(), tokenizer=tokenizer, method=method,
                       on_step=crash)
    finetune_model(converted(tokenizer), blocks(), tmp_path / "b", config(), tokenizer=tokenizer, method=method,
                   resume=True)
    a, b = t2r.load(tmp_path / "a").state_dict(), t2r.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(tmp_path, tokenizer, tiny_converted_dir):
    with pytest.raises(T2RError, match="LoRA rank"):
        finetune_model(converted(tokenizer), blocks(), tmp_path / "o1", config(), method=Finetuning(lora=-1))
    with pytest.raises(SettingsError, match="LoRA rank"):
        finetune_command(str(tiny_converted_dir), options=FinetuneSettings.parse({"lora": -2}),
                         out=str(tmp_path / "o2"), progress=False)
    with pytest.raises(T2RError, match="lora-modules"):
        finetune_model(converted(tokenizer), blocks(), tmp_path / "o3", config(),
                       method=Finetuning(lora=2, lora_modules="q_proj;rm"))
    with pytest.raises(SettingsError, match="budget"):
        finetune_command(str(tiny_converted_dir), options=FinetuneSettings.parse({"tokens": "0"}),
                         out=str(tmp_path / "o4"), progress=False)
    with pytest.raises(T2RError, match="--kd"):
        finetune_command(str(tiny_converted_dir), teacher=str(tiny_converted_dir), out=str(tmp_path / "o5"),
                         progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tokenizer, tiny_converted_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    teacher_dir = tmp_path / "teacher"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(teacher_dir)
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="b").save_pretrained(teacher_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("a b " * 200)
    with pytest.raises(T2RError, match="another tokenizer"):
        finetune_command(str(tiny_converted_dir), data=str(text), options=FinetuneSettings(kd=1.0),
                         teacher=str(teacher_dir), out=str(tmp_path / "o"), block_size=32, progress=False)
    assert not (tmp_path / "o").exists()


def test_finetune_command_end_to_end(tmp_path, tiny_converted_dir, tiny_model_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30)
    common = dict(data=str(text), block_size=64, progress=False)
    r = finetune_command(str(tiny_converted_dir), options=FinetuneSettings(tokens="512", eval_blocks=1, lora=2, kd=1.0),
                         out=str(tmp_path / "ft"), **common)
    assert r["steps"] == 8 and r["lora"] == 2 and r["eval_after"]["ppl"] > 0
    json.dumps(r)
    assert "LoRA rank 2" in render_finetune(r) and "KD 1.0" in render_finetune(r)
    assert t2r.load(tmp_path / "ft").config.t2r["keep_softmax_layers"] == [1]
    # a plain (never converted) model: the baseline "teacher finetuned on the same tokens"
    r = finetune_command(str(tiny_model_dir), options=FinetuneSettings(tokens="512", eval_blocks=1),
                         out=str(tmp_path / "baseline"), **common)
    assert r["steps"] == 8 and (tmp_path / "baseline" / "config.json").is_file()


def test_command_functions_make_valid_cli_parsers(capsys):
    """`t2r.cli` turns the signature and the `Args:` lines into the command line, and a settings model into one flag
    per field: every parameter documented, help renders, flags parse into the function's keyword arguments."""
    import argparse
    import inspect

    from t2r import cli
    from t2r.cli.training import distill_command
    from t2r.train import DistillSettings

    parser = argparse.ArgumentParser(prog="t2r")
    sub = parser.add_subparsers(dest="command")
    for fn in (distill_command, finetune_command):
        assert cli.app._param_help(inspect.getdoc(fn)).keys() == set(inspect.signature(fn).parameters)
        cli.app._add_command(sub, fn)
        with pytest.raises(SystemExit):
            parser.parse_args([cli.app.command_name(fn), "--help"])
        help_text = capsys.readouterr().out
        assert "--resume" in help_text and "--tokens" in help_text and "(default: 300k)" in help_text
    args = vars(parser.parse_args(["finetune", "runs/x", "--lora", "8", "--kd", "0.5", "--no-progress",
                                   "--lr", "1e-4", "--tokens", "1M"]))
    kwargs = cli.app.call_arguments(finetune_command, args)
    options = kwargs["options"]
    assert (options.lora, options.kd, kwargs["progress"], options.lr, options.tokens) == (8, 0.5, False, 1e-4,
                                                                                        1_000_000)
    assert kwargs["model"] == "runs/x" and options.eval_every == 100 and options.eval_blocks == 16
    kwargs = cli.app.call_arguments(distill_command, vars(parser.parse_args(["distill", "runs/x"])))
    assert kwargs["options"] == DistillSettings()  # the defaults of `t2r distill`: lr 3e-2, eval every 250 steps
    assert (kwargs["options"].lr, kwargs["options"].eval_every, kwargs["options"].eval_blocks) == (3e-2, 250, 8)
    assert FinetuneSettings().lr == 3e-5 and FinetuneSettings(lora=4).lr == 2e-4  # the default lr follows --lora


@pytest.mark.parametrize("lora", [0, 4])
def test_recomputing_the_layers_trains_the_same_weights(tmp_path, tokenizer, lora):
    """--checkpoint-layers (long blocks) only trades memory for time: the same weights after three steps with a
    teacher (kd), whole model and LoRA."""
    runs = {}
    for recompute in (False, True):
        model = converted(tokenizer)
        finetune_model(model, blocks(), tmp_path / f"r{recompute}", config(steps=3),
                       tokenizer=tokenizer, method=Finetuning(lora=lora, kd=1.0, checkpoint_layers=recompute))
        assert model.is_gradient_checkpointing == recompute
        runs[recompute] = t2r.load(tmp_path / f"r{recompute}").state_dict()
    assert runs[True].keys() == runs[False].keys()
    for name, tensor in runs[False].items():
        torch.testing.assert_close(runs[True][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_layers_is_a_flag_and_not_recorded():
    options = FinetuneSettings.parse({"checkpoint_layers": True})
    assert options.checkpoint_layers and "checkpoint_layers" not in options.model_dump()
