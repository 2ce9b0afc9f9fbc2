"""Pipeline stages saved as their changes over the stage they were built on (`t2r.stages.delta`): a tiny pipeline
leaves deltas that hold only the changed tensors, each stage reloads to the logits of the model the stage made, the
final model is standalone, a changed or missing parent is one line saying what to do, reruns reuse the deltas and
`--resume` still works; the report gives the run's disk use. The converted stage is a delta over the source model
itself (`t2r.stages.source_root`): only the conversion's tensors, rebuilt bit for bit from the source or refused."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import t2r
from conftest import PRIDE, write_tiny_recipe
from t2r.cli import main
from t2r.attention import is_conversion_parameter
from t2r.stages.delta import StageParentError, fingerprint, materialise
from t2r.stages.disk import final_stage
from t2r.stages.recipes import PipelineRecipe
from t2r.stages.source_root import StageSourceError, rewrite_over_source, source_reference

TEXT = PRIDE
IDS = torch.tensor([[5, 9, 3, 17, 22, 8, 31, 4, 12, 40, 7, 2]])


def _names(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.fixture
def source(tmp_path, tiny_model_dir):
    """A copy of the tiny source model that a test may change or delete."""
    return shutil.copytree(tiny_model_dir, tmp_path / "source")


@pytest.fixture
def recipe(tmp_path, source):
    return write_tiny_recipe(tmp_path, source, checkpoint_every=1)


@pytest.fixture
def run(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(recipe), "--out", str(out), "--json"]) == 0
    return out, json.loads(capsys.readouterr().out)


def test_stages_are_deltas_with_only_changed_tensors(run, source):
    out, results = run
    full = source / "model.safetensors"
    all_names = set(materialise(out / "converted"))
    # the converted stage: the conversion's own tensors over the source model, which it names
    converted = json.loads((out / "converted" / "delta.json").read_text())
    assert "parent" not in converted and converted["source"]["spec"] == str(source)
    assert converted["source"]["kind"] == "dir" and converted["source"]["path"] == str(source.resolve())
    assert converted["removed"] == [] and not list((out / "converted").glob("model*.safetensors"))
    own = _names(out / "converted" / "delta.safetensors")
    assert own == set(converted["tensors"]) == {n for n in all_names if is_conversion_parameter(n)} and own
    assert set(converted["source"]["bytes"]) == _names(full) == all_names - own
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
    assert [r["delta"] for r in disk["stages"]] == [True, True, True, False]
    assert [r["over"] for r in disk["stages"]] == ["source", "parent", "parent", None]
    assert disk["stages_bytes"] < disk["whole_bytes"] and disk["stages_bytes"] <= disk["run_bytes"]
    # saved whole, the converted stage would hold the source's tensor bytes and its own
    whole = t2r.load(out / "converted").state_dict()
    row = disk["stages"][0]
    assert row["whole_bytes"] - row["bytes"] == sum(t.numel() * 4 for t in whole.values()) - (
        (out / "converted" / "delta.safetensors").stat().st_size)
    assert "| converted | changes over its source |" in (out / "report.md").read_text()
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


def test_final_model_standalone_and_parent_checked(run, tmp_path, recipe, source, capsys):
    out, _ = run
    expected = _logits(t2r.load(out / "finetune"))
    moved = tmp_path / "moved"
    shutil.move(str(out / "finetune"), moved)
    shutil.rmtree(out / "converted")
    shutil.rmtree(source)
    assert torch.equal(_logits(t2r.load(moved)), expected)  # whole: loads with its parents and its source gone
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
    assert [r["delta"] for r in results["disk"]["stages"]] == [True, True, False]


def _converted_over_source(tmp_path, source_dir, tokenizer, **convert):
    """The pipeline's converted stage by hand: the source loaded as the pipeline loads it, converted, saved, and
    rewritten over the source with the loaded copy's tensors. Returns (stage directory, the model in memory)."""
    teacher = t2r.sources.load_model(str(source_dir))[0]
    model = t2r.convert(copy.deepcopy(teacher), **convert)
    t2r.save(model, tmp_path / "converted", tokenizer)
    rewrite_over_source(tmp_path / "converted", source_reference(str(source_dir)), teacher.state_dict())
    return tmp_path / "converted", model


@pytest.mark.parametrize("tied", [False, True])
def test_converted_stage_rebuilds_from_its_source_bit_for_bit(tmp_path, tokenizer, tied):
    """Loaded again from the source (tied embeddings too: the tied head is not stored, and tied again on load), the
    converted stage gives the logits of the model the stage made, and holds only the conversion's tensors."""
    from conftest import tiny_model

    source_dir = tmp_path / "source"
    tiny_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=tied).save_pretrained(source_dir)
    tokenizer.save_pretrained(source_dir)
    stage, model = _converted_over_source(tmp_path, source_dir, tokenizer, feature_map="hedgehog", feature_dim=8,
                                          window=4, keep_softmax_layers=(1,))
    meta = json.loads((stage / "delta.json").read_text())
    assert meta["tensors"] and all(is_conversion_parameter(n) for n in meta["tensors"])
    assert meta["removed"] == (["lm_head.weight"] if tied else [])
    reloaded = t2r.load(stage)
    assert torch.equal(_logits(reloaded), _logits(model))
    if tied:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in reloaded.state_dict().items())


def test_changed_or_missing_source_is_one_line(tmp_path, source, tokenizer, capsys):
    stage, _ = _converted_over_source(tmp_path, source, tokenizer, feature_map="t2r", feature_dim=8)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(source / "model.safetensors"))
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 1}, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StageSourceError, match="whose files have changed since: redo the stage .*--redo converted.* "
                                               "or restore the source"):
        t2r.load(stage)
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})  # restored: loads again
    t2r.load(stage)
    # a loader that gives other weights from the same files (another release) is refused, not approximated
    meta = json.loads((stage / "delta.json").read_text())
    (stage / "delta.json").write_text(json.dumps({**meta, "source": {**meta["source"], "base_fingerprint": "0"}}))
    with pytest.raises(StageSourceError, match="loads to other weights"):
        t2r.load(stage)
    (stage / "delta.json").write_text(json.dumps(meta))
    shutil.rmtree(source)
    capsys.readouterr()
    assert main(["generate", str(stage), "--prompt", "It is", "--max-new-tokens", "2"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("t2r")]
    assert len(err) == 1 and err[0].startswith("t2r generate: error:") and "which is gone" in err[0], err
    assert "--redo converted" in err[0]


def test_hub_source_and_random_init_keep_the_converted_stage_whole(run, recipe, capsys):
    """A hub id cannot be rebuilt for sure (a moving revision, the network): no reference; `init: random` replaces
    the source's weights: the converted stage is saved whole."""
    assert source_reference("HuggingFaceTB/SmolLM2-135M") is None
    out, _ = run
    assert main(["pipeline", "--config", str(recipe), "--out", str(out / "random"), "--init", "random",
                 "--finetune", "null", "--keep_softmax", "null", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["delta"]) for r in results["disk"]["stages"]] == [("converted", False), ("distill", False)]


def test_a_loaded_source_is_read_from_memory_as_a_copy(tmp_path, source, tokenizer, monkeypatch):
    """Inside `loaded_source` (the pipeline's original model), a stage over the source is rebuilt from that model's
    tensors without loading the source again, as copies: training the rebuilt model leaves the original alone."""
    from t2r.stages import source_root

    stage, model = _converted_over_source(tmp_path, source, tokenizer, feature_map="t2r", feature_dim=8)
    teacher = t2r.sources.load_model(str(source))[0]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    def no_load(spec):
        raise AssertionError("the source was loaded again")

    monkeypatch.setattr(source_root, "load_model", no_load)
    with source_root.loaded_source(str(source), teacher):
        rebuilt = t2r.load(stage)
    assert torch.equal(_logits(rebuilt), _logits(model))
    with torch.no_grad():
        for param in rebuilt.parameters():
            param.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(AssertionError, match="loaded again"):
        t2r.load(stage)  # outside the block: from the source's files


def test_a_converted_stage_that_becomes_the_final_model_is_materialised(run, recipe, source, capsys):
    """Run again with the conversion alone: the converted stage (a delta over the source) is now the final model, so
    it is saved whole, in place, to the same logits, and loads with the source gone."""
    out, _ = run
    before = _logits(t2r.load(out / "converted"))
    assert main(["pipeline", "--config", str(recipe), "--out", str(out), "--distill", "null", "--finetune", "null",
                 "--keep_softmax", "null", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["final_model"] == str(out / "converted") and not (out / "converted" / "delta.json").exists()
    shutil.rmtree(source)
    assert torch.equal(_logits(t2r.load(out / "converted")), before)
    assert [(r["stage"], r["delta"]) for r in results["disk"]["stages"]] == [("converted", False)]


def test_without_the_source_loader_a_source_delta_says_to_load_it_with_t2r(tmp_path, source, tokenizer, monkeypatch):
    """`t2r.stages.delta` travels in the remote-code bundle, which cannot carry the source loader: there a stage
    saved over its source is refused in one line, not read as a model with missing weights."""
    from t2r.stages import delta

    stage, _ = _converted_over_source(tmp_path, source, tokenizer, feature_map="t2r", feature_dim=8)
    monkeypatch.setattr(delta, "ROOTS", {})
    with pytest.raises(t2r.errors.NotAT2RModelError, match="saved as changes over its source model: load it with t2r"):
        materialise(stage)
