"""Pipeline stages saved as their changes over the stage they were built on (`t2r.stages.delta`): a tiny pipeline
leaves deltas that hold only the changed tensors, each stage reloads to the logits of the model the stage made, the
final model is standalone, a changed or missing parent is one line saying what to do, reruns reuse the deltas and
`--resume` still works; the report gives the run's disk use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open

import t2r
from t2r.cli import main
from t2r.stages.delta import StageParentError, fingerprint, materialise
from t2r.stages.disk import final_stage
from t2r.stages.recipes import PipelineRecipe

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 12
IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 31, 4, 12, 40, 7, 2]])


def _names(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    (tmp_path / "text.txt").write_text(TEXT)
    recipe = {
        "name": "tiny", "model": str(tiny_model_dir), "data": str(tmp_path / "text.txt"), "block_size": 64,
        "convert": {"feature_map": "hedgehog", "feature_dim": 8, "window": 4},
        "distill": {"steps": 3, "lr": 0.01, "eval_every": 0},
        "keep_softmax": "auto:1",
        "finetune": {"steps": 2, "lora": 2, "kd": 0.5, "eval_every": 0, "checkpoint_every": 1},
        "eval": {"data": [str(tmp_path / "text.txt")], "context": 64, "max_blocks": 2},
        "generate": {"prompt": "It is", "max_new_tokens": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def run(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(recipe), "--out", str(out), "--json"]) == 0
    return out, json.loads(capsys.readouterr().out)


def test_stages_are_deltas_with_only_changed_tensors(run):
    out, results = run
    full = out / "converted" / "model.safetensors"
    all_names = _names(full)
    distill = json.loads((out / "distill" / "delta.json").read_text())
    assert distill["parent"] == "../converted" and distill["removed"] == []
    changed = _names(out / "distill" / "delta.safetensors")
    assert changed == set(distill["tensors"]) and changed and changed < all_names  # feature maps and window factors
    assert all(".feature_map" in n or ".mixer." in n for n in changed), changed
    assert (out / "distill" / "delta.safetensors").stat().st_size < full.stat().st_size / 5
    assert not list((out / "distill").glob("model*.safetensors"))
    softmax = json.loads((out / "softmax-layers" / "delta.json").read_text())
    assert softmax["parent"] == "../distill" and softmax["removed"]  # the layer back to softmax lost its map
    assert softmax["tensors"] == []  # nothing else changed
    assert all(".layers." in n for n in softmax["removed"])
    # the final model (finetune, LoRA merged) is whole and standalone
    assert not (out / "finetune" / "delta.json").exists() and (out / "finetune" / "model.safetensors").is_file()
    assert final_stage(PipelineRecipe.model_validate(results["recipe"])) == "finetune"
    disk = results["disk"]
    assert [r["stage"] for r in disk["stages"]] == ["converted", "distill", "softmax-layers", "finetune"]
    assert [r["delta"] for r in disk["stages"]] == [False, True, True, False]
    assert disk["stages_bytes"] < disk["whole_bytes"] and disk["stages_bytes"] <= disk["run_bytes"]
    assert "## Disk use" in (out / "report.md").read_text()
    assert sum(r["bytes"] for r in disk["stages"]) == disk["stages_bytes"]


def test_deltas_reload_to_the_same_logits(run, tmp_path):
    out, _ = run
    # a delta materialised: every tensor of the saved-whole twin, identical
    converted = t2r.load(out / "converted")
    distilled = t2r.load(out / "distill")
    assert not torch.equal(_logits(converted), _logits(distilled))  # stage 1 changed something
    whole = tmp_path / "distill-whole"
    t2r.save(distilled, whole)
    reloaded = t2r.load(whole)
    assert torch.equal(_logits(reloaded), _logits(distilled))
    with safe_open(str(whole / "model.safetensors"), framework="pt") as f:
        tensors = materialise(out / "distill")
        assert set(f.keys()) == set(tensors)
        assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in f.keys())
    # the chain finetune <- softmax-layers <- distill <- converted reloads; the CLI reads deltas too
    softmax = t2r.load(out / "softmax-layers")
    assert len(softmax.config.t2r["keep_softmax_layers"]) == 1
    assert main(["eval", str(out / "softmax-layers"), "--data", str(tmp_path / "text.txt"), "--max-blocks", "1",
                 "--json"]) == 0


def test_in_memory_stage_model_equals_its_reload(tmp_path, tiny_model_dir, tokenizer):
    """The model at the end of a stage, in memory, gives the logits its delta directory reloads to."""
    from t2r.stages.delta import rewrite_as_delta

    model = t2r.convert(t2r.sources.load_model(str(tiny_model_dir))[0], feature_map="hedgehog", feature_dim=8,
                        window=4)
    t2r.save(model, tmp_path / "converted", tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".feature_map" in name:
                param.add_(0.01 * torch.randn_like(param))
    t2r.save(model, tmp_path / "distill", tokenizer)
    report = rewrite_as_delta(tmp_path / "distill", tmp_path / "converted")
    assert report["tensors"] > 0 and report["removed"] == 0
    assert torch.equal(_logits(t2r.load(tmp_path / "distill")), _logits(model))


def test_final_model_standalone_and_parent_checked(run, tmp_path, recipe, capsys):
    out, _ = run
    expected = _logits(t2r.load(out / "finetune"))
    moved = tmp_path / "moved"
    shutil.move(str(out / "finetune"), moved)
    shutil.rmtree(out / "converted")
    assert torch.equal(_logits(t2r.load(moved)), expected)  # whole: loads with its parents gone
    with pytest.raises(StageParentError, match="which is gone: redo the stage .*--redo distill"):
        t2r.load(out / "distill")
    with pytest.raises(StageParentError, match="gone"):
        t2r.load(out / "softmax-layers")  # through the chain
    capsys.readouterr()
    assert main(["generate", str(out / "distill"), "--prompt", "It is", "--max-new-tokens", "2"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("t2r")]
    assert len(err) == 1 and err[0].startswith("t2r generate: error:") and "--redo distill" in err[0]
    # a parent whose weights changed is refused too
    from safetensors.torch import load_file, save_file

    rewritten = {k: v + 1 for k, v in load_file(str(out / "distill" / "delta.safetensors")).items()}
    before = fingerprint(out / "distill")
    save_file(rewritten, str(out / "distill" / "delta.safetensors"), metadata={"format": "pt"})
    assert fingerprint(out / "distill") != before
    with pytest.raises(StageParentError, match="whose weights have changed since"):
        t2r.load(out / "softmax-layers")


def test_rerun_reuses_deltas_and_redo_rebuilds(run, recipe, capsys, caplog):
    out, results = run
    stamp = {s: (out / s / "stage.json").stat().st_mtime_ns for s in ("converted", "distill", "softmax-layers")}
    with caplog.at_level("INFO", logger="t2r.stages.pipeline"):
        assert main(["pipeline", "--config", str(recipe), "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["ppl"] for r in again["stages"]] == [r["ppl"] for r in results["stages"]]
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in stamp} == stamp  # reused, not rebuilt
    assert "reusing" in caplog.text and "disk: the stages take" in caplog.text
    # redoing the conversion (same seed: same weights) rebuilds the deltas on it
    assert main(["pipeline", "--config", str(recipe), "--out", str(out), "--redo", "converted", "--json"]) == 0
    redone = json.loads(capsys.readouterr().out)
    assert redone["stages"][-1]["ppl"] == results["stages"][-1]["ppl"]
    assert (out / "distill" / "delta.json").is_file()


def test_resume_interrupted_finetune_over_deltas(tmp_path, recipe, capsys, monkeypatch):
    """Stage 2 fails after its checkpoint at step 1; running the recipe again resumes it there, on its delta
    parents, and ends with the weights of an uninterrupted run."""
    from t2r.train.trainer import Trainer

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["pipeline", "--config", str(recipe), "--out", str(whole), "--json"]) == 0
    capsys.readouterr()
    step = Trainer._train_step

    def failing(self):
        if self.out.name == "finetune" and self.step == 1:
            raise RuntimeError("killed")
        return step(self)

    monkeypatch.setattr(Trainer, "_train_step", failing)
    with pytest.raises(RuntimeError, match="killed"):
        main(["pipeline", "--config", str(recipe), "--out", str(cut)])
    assert (cut / "finetune" / "checkpoint").is_dir() and not (cut / "finetune" / "stage.json").exists()
    assert (cut / "softmax-layers" / "delta.json").is_file()
    monkeypatch.setattr(Trainer, "_train_step", step)
    assert main(["pipeline", "--config", str(recipe), "--out", str(cut), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][-1]["stage"] == "after stage 2 (finetuning)"
    a, b = materialise(whole / "finetune"), materialise(cut / "finetune")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_class_reads_a_delta(run):
    """After `import t2r`, plain transformers rebuilds a delta stage too (never a model with missing weights)."""
    from transformers import AutoModelForCausalLM

    out, _ = run
    model, info = AutoModelForCausalLM.from_pretrained(out / "distill", output_loading_info=True)
    assert not info["missing_keys"]
    assert torch.equal(_logits(model), _logits(t2r.load(out / "distill")))
    assert model.config.name_or_path == str(out / "distill")


def test_a_delta_that_becomes_the_final_model_is_materialised(run, recipe, capsys):
    """Run again without stage 2: the softmax-layers stage (a delta) is now the final model, so it is saved whole,
    in place, and loads to the same logits."""
    out, _ = run
    before = _logits(t2r.load(out / "softmax-layers"))
    assert main(["pipeline", "--config", str(recipe), "--out", str(out), "--finetune", "null", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["final_model"] == str(out / "softmax-layers")
    assert not (out / "softmax-layers" / "delta.json").exists()
    assert (out / "softmax-layers" / "model.safetensors").is_file()
    assert torch.equal(_logits(t2r.load(out / "softmax-layers")), before)
    assert [r["delta"] for r in results["disk"]["stages"]] == [False, True, False]
