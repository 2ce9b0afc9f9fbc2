"""The command line, called in-process through `t2r.cli.main` (plus one run of the installed `t2r` script): results on
stdout (JSON with --json), and every bad input ends in exit code 2 with one `t2r <command>: error: ...` line, no
traceback, and nothing written."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import typing

import pytest
import torch
import transformers

import t2r
import t2r.cli
from t2r.cli import app as cli_main
from t2r.cli import models as model_commands
from t2r.settings import model_in

EXIT_USAGE = 2
CONVERT_FLAGS = ["--feature-map", "t2r", "--feature-dim", "8"]


def command_flags(fn) -> list[str]:
    """The flags of a command function: one per keyword-only parameter (`as_json` is --json), one per field of a
    parameter typed with a settings model."""
    hints = typing.get_type_hints(fn)
    flags = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        if model_in(hints[name]) is not None:  # `options: ConvertSettings | None` too
            flags += [f"--{field.replace('_', '-')}" for field in model_in(hints[name]).model_fields]
        else:
            flags.append("--json" if name == "as_json" else f"--{name.replace('_', '-')}")
    return flags


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `t2r ARGV`; argparse's own exits count like any other."""
    try:
        code = t2r.cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, command: str, *words: str) -> str:
    """Exit code 2, no traceback, and exactly one error line, the last one, naming the command; returns it."""
    assert code == EXIT_USAGE, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    prefix = f"t2r {command}: error:"
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def assert_nothing_written(out_dir) -> None:
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory, tiny_model_dir):
    """A model converted by `t2r convert` (window 2, layer 0 kept softmax)."""
    out = tmp_path_factory.mktemp("cli") / "rnn"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = t2r.cli.main(["-q", "convert", str(tiny_model_dir), "--out", str(out), *CONVERT_FLAGS,
                             "--window", "2", "--keep-softmax-layers", "0"])
    assert code == 0
    return out


# ------------------------------------------------------------------------------------------------------ success


def test_convert(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "rnn"
    args = ["convert", tiny_model_dir, "--out", out, *CONVERT_FLAGS, "--window", "2", "--keep-softmax-layers", "0"]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    assert (out / "config.json").is_file()
    assert f"-> {out}" in stdout and "2 linear attention layers" in stdout

    code, stdout, _ = run_cli(capsys, *args, "--json", "--overwrite")
    assert code == 0
    result = json.loads(stdout)
    assert result["out"] == str(out)
    assert result["linear_layers"] == 2
    recipe = result["recipe"]
    assert (recipe["feature_map"], recipe["feature_dim"], recipe["window"], recipe["keep_softmax_layers"]) == \
        ("t2r", 8, 2, [0])
    assert json.loads((out / "config.json").read_text())["t2r"] == recipe
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rnn"]


def test_verify_json(capsys, cli_out):
    code, stdout, _ = run_cli(capsys, "verify", cli_out, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["ok"] is True and report["exit_code"] == 0
    errors = {k: v for k, v in report.items() if "max_rel_err_" in k}
    for check in ("chunk_vs_quadratic", "recurrent_vs_full", "padded_vs_alone"):
        assert f"max_rel_err_{check}" in errors, report
    for key, value in errors.items():
        assert isinstance(value, float) and 0 <= value < report["tolerance"], (key, report)


def test_verify_human(capsys, cli_out):
    code, stdout, _ = run_cli(capsys, "verify", cli_out, "--tokens", 20, "--prefill", 7)
    assert code == 0
    assert "max_rel_err_recurrent_vs_full" in stdout
    assert stdout.splitlines()[-1].startswith("OK")


def test_verify_mismatch_exits_1(capsys, cli_out, monkeypatch):
    verify_module = importlib.import_module("t2r.verify")  # the command imports `verify` from it when it runs
    real_verify = verify_module.verify

    def mismatching_verify(model, **kwargs):
        report = real_verify(model, **kwargs)
        report["max_rel_err_recurrent_vs_full"] = 0.5
        report["ok"] = False
        return report

    monkeypatch.setattr(verify_module, "verify", mismatching_verify)
    code, stdout, _ = run_cli(capsys, "verify", cli_out, "--tokens", 20, "--prefill", 7)
    assert code == 1
    assert "MISMATCH" in stdout and "0.5" in stdout
    code, stdout, _ = run_cli(capsys, "verify", cli_out, "--tokens", 20, "--prefill", 7, "--json")
    assert code == 1
    report = json.loads(stdout)
    assert report["ok"] is False and report["exit_code"] == 1


def test_generate_json(capsys, cli_out):
    code, stdout, _ = run_cli(capsys, "generate", cli_out, "--prompt", "hi", "--max-new-tokens", 5, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["prompt"] == "hi"
    assert isinstance(result["text"], str)
    assert 1 <= result["new_tokens"] <= 5  # 5 unless the model emits EOS first
    assert result["seconds"] >= 0
    assert result["state_bytes"] > 0


def test_generate_human(capsys, cli_out):
    code, stdout, _ = run_cli(capsys, "generate", cli_out, "--prompt", "hello there", "--max-new-tokens", 3)
    assert code == 0
    assert stdout.startswith("hello there")
    assert "tokens in" in stdout and "state" in stdout


def test_installed_script_help():
    """The console script `t2r` is installed and its help lists every command and every flag."""
    script = shutil.which("t2r", path=os.path.dirname(sys.executable)) or shutil.which("t2r")
    assert script, "the t2r console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {argv: subprocess.Popen([script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for argv in (("--help",), ("convert", "--help"))}  # both at once: each start-up imports torch
    results = {argv: (proc.communicate(timeout=120), proc.returncode) for argv, proc in procs.items()}

    (stdout, stderr), code = results[("--help",)]
    assert code == 0, stderr
    for fn in cli_main.COMMANDS:
        assert cli_main.command_name(fn) in stdout
    assert "--quiet" in stdout

    (stdout, stderr), code = results[("convert", "--help")]
    assert code == 0, stderr
    flags = command_flags(model_commands.convert_command)
    assert len(flags) >= 10
    for flag in flags:
        assert flag in stdout, flag
    assert "model" in stdout


def test_help_in_process_mentions_every_flag(capsys):
    for fn in cli_main.COMMANDS:
        code, stdout, _ = run_cli(capsys, cli_main.command_name(fn), "--help")
        assert code == 0
        for flag in command_flags(fn):
            assert flag in stdout, (fn.__name__, flag)


# ---------------------------------------------------------------------------------------------------- bad input


def test_convert_unknown_model_path(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", tmp_path / "nope", "--out", out)
    assert_usage_error(code, err, "convert", "no such")
    assert_nothing_written(out)


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_convert_unsupported_architecture(capsys, tmp_path, family):
    if family == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=300, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=64))
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=64))
    model.save_pretrained(tmp_path / family)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", tmp_path / family, "--out", out)
    assert_usage_error(code, err, "convert", f"model type '{family}'", "supported:", "llama", "gpt2")
    assert_nothing_written(out)


def test_convert_unknown_feature_map(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", tiny_model_dir, "--out", out, "--feature-map", "bogus")
    assert_usage_error(code, err, "convert", "bogus", "known:", "hedgehog", "t2r", "elu", "performer")
    assert_nothing_written(out)


def test_convert_random_init(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "rnn"
    code, stdout, _ = run_cli(capsys, "convert", tiny_model_dir, "--out", out, *CONVERT_FLAGS, "--init", "random",
                              "--json")
    assert code == 0 and json.loads(stdout)["init"] == "random"
    pretrained = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh = t2r.load(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fresh.state_dict()[name], pretrained.state_dict()[name])
    code, _, err = run_cli(capsys, "convert", tiny_model_dir, "--out", tmp_path / "x", "--init", "scratch")
    assert_usage_error(code, err, "convert", "--init", "pretrained or random")
    assert_nothing_written(tmp_path / "x")


@pytest.mark.parametrize("dim", ["0", "-3"])
def test_convert_bad_feature_dim(capsys, tmp_path, tiny_model_dir, dim):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", tiny_model_dir, "--out", out, "--feature-map", "t2r",
                           "--feature-dim", dim)
    assert_usage_error(code, err, "convert", "feature_dim", "positive")
    assert_nothing_written(out)


@pytest.mark.parametrize("layers, words", [("0,99", ("[99]", "out of range", "0..2")),
                                           ("x", ("comma-separated", "'x'"))])
def test_convert_bad_keep_softmax_layers(capsys, tmp_path, tiny_model_dir, layers, words):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", tiny_model_dir, "--out", out, *CONVERT_FLAGS,
                           "--keep-softmax-layers", layers)
    assert_usage_error(code, err, "convert", *words)
    assert_nothing_written(out)


def test_convert_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", "some-org/some-model", "--out", out)
    assert_usage_error(code, err, "convert", "HF_HUB_OFFLINE")
    assert_nothing_written(out)


def test_convert_to_existing_out(capsys, tmp_path, tiny_model_dir, cli_out):
    out = tmp_path / "rnn"
    shutil.copytree(cli_out, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(capsys, "convert", tiny_model_dir, "--out", out, *CONVERT_FLAGS)
    assert_usage_error(code, err, "convert", "already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rnn"]


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_not_a_t2r_model(capsys, tmp_path, tiny_model_dir, command):
    code, _, err = run_cli(capsys, command, tiny_model_dir)
    assert_usage_error(code, err, command, "not a converted one", "t2r convert")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, command, tmp_path / "empty")
    assert_usage_error(code, err, command, "no config.json", "t2r convert")
    code, _, err = run_cli(capsys, command, tmp_path / "missing")
    assert_usage_error(code, err, command, "not a directory")


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_truncated_safetensors(capsys, tmp_path, cli_out, command):
    path = tmp_path / "rnn"
    shutil.copytree(cli_out, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, command, path)
    assert_usage_error(code, err, command, "damaged or truncated")


def test_safetensors_with_invalid_header_dtype(capsys, tmp_path, cli_out):
    path = tmp_path / "rnn"
    shutil.copytree(cli_out, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header[next(k for k in header if k != "__metadata__")]["dtype"] = "Q9"
    weights.write_bytes(data[:8] + json.dumps(header, separators=(",", ":")).encode().ljust(n) + data[8 + n:])
    try:
        code, _, err = run_cli(capsys, "verify", path)
    except Exception as exc:  # noqa: BLE001  (what a user sees as a traceback)
        pytest.fail(f"uncaught {type(exc).__name__}: {exc}")
    assert_usage_error(code, err, "verify", "damaged or truncated")


def test_generate_zero_new_tokens(capsys, cli_out):
    code, stdout, err = run_cli(capsys, "generate", cli_out, "--max-new-tokens", 0)
    assert_usage_error(code, err, "generate", "--max-new-tokens", "positive")
    assert stdout == ""


# ---------------------------------------------------------------------------------- typed settings and --json


def test_every_command_reports_with_json_and_no_name_shadows():
    """Every command has --json (its parameter is `as_json`); no command or parameter is named after a builtin or a
    standard module, or after something its own module defines or imports."""
    import builtins

    assert [cli_main.command_name(fn) for fn in cli_main.COMMANDS] == [
        "convert", "generate", "chat", "verify", "data", "distill", "finetune", "eval", "lm-eval", "recall", "pipeline", "bench",
        "demo", "export", "translate"]
    taken = set(dir(builtins)) | set(sys.stdlib_module_names)
    for fn in cli_main.COMMANDS:
        params = inspect.signature(fn).parameters
        assert "as_json" in params and "--json" in command_flags(fn), fn.__name__
        assert fn.__name__ not in taken, fn.__name__
        shadowing = [name for name in params if name in taken or name in fn.__globals__]
        assert not shadowing, (fn.__name__, shadowing)


@pytest.mark.parametrize("command, argv, words", [
    ("distill", ["--lr", "abc"], ["--lr", "valid number", "'abc'"]),
    ("distill", ["--tokens", "lots"], ["--tokens", "300k", "'lots'"]),
    ("distill", ["--batch-size", "0"], ["--batch-size", "greater than 0"]),
    ("distill", ["--tokenz", "3"], ["unrecognized", "--tokenz"]),
    ("finetune", ["--lora", "-1"], ["--lora", "LoRA rank"]),
    ("finetune", ["--kd", "x"], ["--kd", "'x'"]),
    ("convert", ["--window", "1.5"], ["--window", "integer"]),
    ("bench", ["--contexts", "a,b"], ["--contexts", "comma-separated"]),
])
def test_bad_settings_on_the_command_line(capsys, tmp_path, tiny_converted_dir, command, argv, words):
    """A wrong type or an unknown flag: one line naming the flag, exit code 2, before anything is loaded."""
    out = tmp_path / "out"
    extra = [] if command == "bench" else ["--out", out]
    code, stdout, err = run_cli(capsys, command, tiny_converted_dir, *extra, *argv)
    assert_usage_error(code, err, command, *words)
    assert stdout == ""
    assert_nothing_written(out)


def test_training_flags_and_json_on_every_quick_command(capsys, tmp_path, tiny_converted_dir):
    """`t2r distill MODEL --tokens 256 --lr 0.01` as before the settings models; --json prints the result of data,
    distill, finetune, eval and bench (convert, generate, verify and pipeline: above and in test_pipeline.py)."""
    text = tmp_path / "corpus.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30)
    data = tmp_path / "data"
    code, stdout, _ = run_cli(capsys, "data", text, "--out", data, "--model", tiny_converted_dir, "--block-size", 64,
                              "--json")
    assert code == 0 and json.loads(stdout)["block_size"] == 64
    code, stdout, _ = run_cli(capsys, "distill", tiny_converted_dir, "--data", data, "--tokens", "256", "--lr", "0.01",
                              "--eval-blocks", 1, "--no-progress", "--out", tmp_path / "distilled", "--json")
    result = json.loads(stdout)
    assert code == 0 and (result["steps"], result["tokens"]) == (4, 256)
    state = json.loads((tmp_path / "distilled" / "train.json").read_text())
    assert state["steps"] == 4
    code, stdout, _ = run_cli(capsys, "finetune", tmp_path / "distilled", "--data", data, "--tokens", "128", "--lora",
                              2, "--eval-blocks", 1, "--no-progress", "--out", tmp_path / "ft", "--json")
    result = json.loads(stdout)
    assert code == 0 and (result["steps"], result["lora"]) == (2, 2)
    code, stdout, _ = run_cli(capsys, "eval", tmp_path / "ft", "--data", data, "--context", 64, "--max-blocks", 1,
                              "--json")
    assert code == 0 and json.loads(stdout)["student"]["ppl"] > 0
    code, stdout, _ = run_cli(capsys, "bench", tmp_path / "ft", "--contexts", 16, "--batch", 1, "--decode-tokens", 2,
                              "--warmup", 0, "--train-steps", 0, "--generate-tokens", 0, "--threads", 1, "--json")
    result = json.loads(stdout)
    assert code == 0 and result["contexts"] == [16] and result["decode_tokens"] == 2
