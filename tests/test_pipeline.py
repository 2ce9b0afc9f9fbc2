"""`t2r pipeline` on a tiny model and a small text: every stage runs, the report is written, a rerun reuses what
was made with the same settings and refuses what was not; recipes are typed, overridable on the command line, and a
bad key is one line naming it and the file."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import t2r
from conftest import PRIDE, write_tiny_recipe
from t2r.cli import main
from t2r.stages.pipeline import worst_layers
from t2r.stages.recipes import PipelineRecipe, RecipeFileError, parse_keep_softmax, shipped_recipes

TEXT = PRIDE


@pytest.fixture
def recipe_file(tmp_path, tiny_model_dir):
    return write_tiny_recipe(tmp_path, tiny_model_dir)


def test_pipeline_end_to_end_and_resume(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(recipe_file), "--out", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    stages = [row["stage"] for row in results["stages"]]
    assert stages[0] == "original" and stages[1] == "after swap" and len(stages) == 5
    assert results["final_model"] == str(out / "finetune")
    assert len(results["layer_errors"]) == 3
    model = t2r.load(out / "finetune")
    assert len(model.config.t2r["keep_softmax_layers"]) == 1
    report = (out / "report.md").read_text()
    assert "Held-out perplexity" in report and "decode ms/token" in report
    # a second run finds every stage finished and reports the same final perplexity
    assert main(["pipeline", "--config", str(recipe_file), "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["stages"][-1]["ppl"] == results["stages"][-1]["ppl"]


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconvrt: {}\n")
    with pytest.raises(RecipeFileError, match="convrt: unknown setting; known: name, model"):
        PipelineRecipe.from_file(bad)
    bad.write_text("name: x\ndistill: {tokenz: 3}\n")
    with pytest.raises(RecipeFileError, match="distill.tokenz: unknown setting; known: tokens"):
        PipelineRecipe.from_file(bad)
    with pytest.raises(RecipeFileError, match="does not exist"):
        PipelineRecipe.from_file(tmp_path / "missing.yaml")
    with pytest.raises(RecipeFileError, match="auto:N"):
        parse_keep_softmax("auto:30", 30)
    assert parse_keep_softmax("auto:3", 30) == ("auto", 3)
    assert parse_keep_softmax([15, 0], 30) == ("fixed", [0, 15])
    assert worst_layers([0.1, 0.5, 0.3, 0.5], 2) == [1, 3]


def test_shipped_recipes_parse():
    recipes = shipped_recipes()
    assert {"t2r-paper", "random-init-baseline", "t2r-transfer", "hedgehog-transfer", "hybrid-window-auto",
            "demo"} <= set(recipes)
    for name in recipes:
        assert PipelineRecipe.from_file(name).name == name


def test_pipeline_random_init_baseline(recipe_file, tmp_path, tiny_model_dir, capsys):
    """`init: random`: the same RNN from random weights; the teacher row still comes from the pretrained model."""
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe.update(init="random", keep_softmax=None, distill=None)
    recipe["finetune"] = {"steps": 2, "lora": 0, "lr": 1e-3, "eval_every": 0}
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", "--config", str(path), "--out", str(tmp_path / "run"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [row["stage"] for row in results["stages"]] == ["original", "after swap", "after stage 2 (finetuning)"]
    assert results["recipe"]["init"] == "random"
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    student = t2r.load(tmp_path / "run" / "converted").state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"):
        assert not torch.equal(student[name], teacher[name]), name
    recipe["init"] = "scratch"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeFileError, match="init: must be one of pretrained, random, got 'scratch'"):
        PipelineRecipe.from_file(path)


def test_pipeline_teacher_finetune_is_the_reference_and_the_kd_teacher(recipe_file, tmp_path, capsys, monkeypatch):
    """`teacher_finetune`: the original is finetuned on the same data into OUT/teacher-finetune, reported beside the
    stages as the reference, and stage 2's KD distils from it (not from the unfinetuned original)."""
    import t2r.stages.pipeline

    calls = []
    real = t2r.stages.pipeline.finetune_model

    def spy(model, *args, **kwargs):
        calls.append(kwargs["method"].teacher)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(t2r.stages.pipeline, "finetune_model", spy)
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe.update(keep_softmax=None, distill=None, teacher_finetune={"steps": 2, "lora": 2, "lr": 1e-2,
                                                                     "eval_every": 0})
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(path), "--out", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert (out / "teacher-finetune" / "train.json").is_file()
    ref, original = results["reference"]["ppl"], results["stages"][0]["ppl"]
    assert ref.keys() == original.keys() and ref != original  # the finetuned original, evaluated on the same sets
    assert [row["stage"] for row in results["stages"]][-1] == "after stage 2 (finetuning)"
    assert "original finetuned (reference)" in (out / "report.md").read_text()
    assert len(calls) == 2 and calls[0] is None  # the reference's own run has no KD teacher
    saved = AutoModelForCausalLM.from_pretrained(out / "teacher-finetune").state_dict()
    kd_teacher = calls[1].state_dict()
    assert all(torch.equal(kd_teacher[k], saved[k]) for k in saved)
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("teacher_finetune:", "teacher_finetune:\n  kd: 1\n", 1))
    with pytest.raises(RecipeFileError, match="teacher_finetune: kd is not a setting here"):
        PipelineRecipe.from_file(bad)


# ------------------------------------------------------------------------ typed recipes, overrides, stage records


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str, *words: str) -> str:
    """Exit code 2 and exactly one `t2r pipeline: error:` line, the last one, holding `words`."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("t2r pipeline: error:")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def stage_files(out) -> dict:
    """stage -> the modification time of its stage.json (changes only when the stage is made again)."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/stage.json")}


@pytest.mark.parametrize("section, entry, words", [
    ("distill", {"tokenz": 3}, ["distill.tokenz", "unknown setting", "known: tokens"]),
    ("distill", {"lr": "fast"}, ["distill.lr", "valid number", "'fast'"]),
    ("convert", {"window": "x"}, ["convert.window", "valid integer"]),
    ("eval", {"max_blocks": 0}, ["eval.max_blocks", "greater than 0"]),
    ("finetune", {"lora": -1}, ["finetune.lora", "LoRA rank"]),
])
def test_a_bad_key_or_value_in_the_file_is_one_line(recipe_file, tmp_path, capsys, section, entry, words):
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe[section] = {**recipe[section], **entry}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, stdout, err = run_cli(capsys, "pipeline", "--config", path, "--out", tmp_path / "run")
    error_line(code, err, f"recipe {path}:", *words)
    assert stdout == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, words", [
    (["--distill.tokenz", "4k"], ["--distill.tokenz (command line)", "unknown setting", "tiny.yaml"]),
    (["--eval.max_blocks", "two"], ["--eval.max_blocks (command line)", "valid integer", "'two'"]),
    (["--distill.tokens"], ["--distill.tokens needs a value"]),
    (["--name.first", "x"], ["--name.first", "name is not a section"]),
    (["--redo", "bogus"], ["--redo takes stage names", "bogus"]),
    (["--redo", "teacher-finetune"], ["--redo teacher-finetune", "no such stage"]),
])
def test_a_bad_override_is_one_line(recipe_file, tmp_path, capsys, argv, words):
    code, stdout, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", tmp_path / "run", *argv)
    error_line(code, err, *words)
    assert stdout == "" and not (tmp_path / "run").exists()


def test_overrides_set_any_recipe_value(recipe_file, tmp_path, capsys):
    """`--distill.tokens 128` (YAML values, dotted keys) replaces the file's value; `--finetune null` drops a stage."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", out, "--distill.steps", 0,
                                "--distill.tokens", "128", "--eval.max_blocks=1", "--keep_softmax", "null",
                                "--finetune", "null", "--json")
    assert code == 0, err
    results = json.loads(stdout)
    assert results["recipe"]["distill"]["tokens"] == 128 and results["recipe"]["eval"]["max_blocks"] == 1
    assert [row["stage"] for row in results["stages"]][-1] == "after stage 1 (attention transfer)"
    assert json.loads((out / "distill" / "train.json").read_text())["steps"] == 2  # 128 tokens, 64 per step
    assert json.loads((out / "distill" / "stage.json").read_text())["settings"]["distill"]["tokens"] == 128


def test_a_rerun_reuses_refuses_and_redoes_stages(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", out, "--json")
    assert code == 0, err
    first = json.loads(stdout)
    made = stage_files(out)
    assert set(made) == {"converted", "distill", "softmax-layers", "finetune"}
    keys = {stage: set(json.loads((out / stage / "stage.json").read_text())["settings"]) for stage in made}
    assert keys["converted"] == {"model", "init", "convert"}
    assert keys["distill"] == keys["converted"] | {"data", "block_size", "distill"}
    assert keys["softmax-layers"] == keys["distill"] | {"keep_softmax"}
    assert keys["finetune"] == keys["softmax-layers"] | {"finetune", "teacher_finetune"}
    # the same settings: every stage is reused as it is
    code, stdout, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", out, "--json")
    assert code == 0, err
    assert stage_files(out) == made and json.loads(stdout)["stages"] == first["stages"]
    # another setting: refused before anything is loaded, naming the stage, the setting and both values
    code, _, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", out, "--finetune.lora", 4)
    error_line(code, err, "stage finetune", "finetune.lora: 2 there, 4 in the recipe", "--redo finetune")
    assert stage_files(out) == made
    code, _, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", out, "--finetune.lora", 4,
                           "--redo", "finetune")
    assert code == 0, err
    again = stage_files(out)
    assert again["finetune"] != made["finetune"] and {s: again[s] for s in made if s != "finetune"} == \
        {s: made[s] for s in made if s != "finetune"}
    assert json.loads((out / "finetune" / "stage.json").read_text())["settings"]["finetune"]["lora"] == 4
    # a change upstream: named at its own stage; --redo distill redoes it and the stages built on it
    code, _, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", out, "--finetune.lora", 4,
                           "--distill.lr", 0.02)
    error_line(code, err, "stage distill", "distill.lr: 0.01 there, 0.02 in the recipe", "--redo distill")
    code, _, err = run_cli(capsys, "pipeline", "--config", recipe_file, "--out", out, "--finetune.lora", 4,
                           "--distill.lr", 0.02, "--redo", "distill")
    assert code == 0, err
    last = stage_files(out)
    assert last["converted"] == made["converted"]
    assert all(last[s] != again[s] for s in ("distill", "softmax-layers", "finetune"))


def test_a_stage_without_recorded_settings_is_not_reused(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe.update(keep_softmax=None, finetune=None)
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli(capsys, "pipeline", "--config", path, "--out", out)[0] == 0
    (out / "distill" / "stage.json").unlink()  # as a stage made before t2r recorded them
    code, _, err = run_cli(capsys, "pipeline", "--config", path, "--out", out)
    error_line(code, err, "stage distill", "no recorded settings", "--redo distill")
    code, _, err = run_cli(capsys, "pipeline", "--config", path, "--out", out, "--redo", "distill")
    assert code == 0, err
    assert (out / "distill" / "stage.json").is_file()


def test_an_interrupted_stage_resumes_only_with_the_same_settings(recipe_file, tmp_path, capsys, monkeypatch):
    import t2r.stages.pipeline

    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 2:
            raise Crash

    real = t2r.stages.pipeline.attention_transfer
    monkeypatch.setattr(t2r.stages.pipeline, "attention_transfer", lambda *a, **kw: real(*a, **kw, on_step=crash))
    out = tmp_path / "run"
    common = ["pipeline", "--config", recipe_file, "--out", out, "--distill.checkpoint_every", 1]
    with pytest.raises(Crash):
        main([str(a) for a in common])
    capsys.readouterr()
    assert (out / "distill" / "checkpoint").is_dir() and not (out / "distill" / "stage.json").exists()
    monkeypatch.setattr(t2r.stages.pipeline, "attention_transfer", real)
    code, _, err = run_cli(capsys, *common, "--distill.lr", 0.02)
    error_line(code, err, "stage distill", "distill.lr: 0.01 there, 0.02 in the recipe")
    code, _, err = run_cli(capsys, *common)
    assert code == 0, err
    assert json.loads((out / "distill" / "train.json").read_text())["resumed_from_step"] == 2
