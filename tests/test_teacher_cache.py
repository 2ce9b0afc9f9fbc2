"""Stage 2 with a cached teacher (`--kd-top-k`): the KL over k + 1 outcomes is the full KL at k = vocabulary (values and
gradients) and >= 0 below it; a run reading the cache at k = vocabulary follows the live teacher's loss curve; a second
run reads instead of running the teacher; the cache is keyed by the teacher and the tokens; an interrupted fill leaves
no shard that reads as complete, a damaged shard is recomputed with a warning; LoRA, full finetuning, resume, the
pipeline and the command line all take the setting."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import t2r
from conftest import tiny_model
from t2r.cli import main
from t2r.data import TokenBlocks
from t2r.errors import T2RError
from t2r.stages import teacher_cache
from t2r.stages.finetune import Finetuning, finetune_model
from t2r.stages.teacher_cache import TeacherCache, block_name, cached_teacher_loss, coarse_kl, top_k_targets
from t2r.train import FinetuneSettings, SettingsError, TrainConfig
from t2r.train.checkpoint import recorded_settings


def converted(tokenizer):
    return t2r.convert(tiny_model("llama", vocab_size=len(tokenizer)), feature_map="hedgehog", feature_dim=8,
                       window=4)


def blocks(seed: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    return TokenBlocks(torch.randint(3, 30, (6, 24), generator=g), torch.randint(3, 30, (2, 24), generator=g), {})


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 3e-3, "steps": 3, "batch_size": 2, "warmup": 0, "eval_every": 0, "eval_blocks": 1,
                          "checkpoint_every": 0, "progress": False, **kw})


def counted(model):
    """`model` with a list that grows by the batch size at every forward."""
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    return model, calls


def losses(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_coarse_kl_is_the_full_kl_at_full_vocabulary_and_smaller_below():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 7, 50, generator=g) * 3
    teacher[0, 0, :5] = float("-inf")  # tokens the teacher rules out
    student = (torch.randn(2, 7, 50, generator=g) * 3).requires_grad_()
    full = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                    reduction="none").nan_to_num().sum(-1).mean()  # the live loss, with 0 * log 0 = 0
    (full_grad,) = torch.autograd.grad(full, student)
    cached = coarse_kl(student, top_k_targets(teacher, 50))
    (cached_grad,) = torch.autograd.grad(cached, student)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_grad, full_grad, rtol=1e-5, atol=1e-6)
    for k in (1, 8, 49):
        kl = coarse_kl(student, top_k_targets(teacher, k))
        (grad,) = torch.autograd.grad(kl, student)
        assert 0 <= kl <= full + 1e-6 and torch.isfinite(grad).all()
    assert coarse_kl(teacher, top_k_targets(teacher, 8)).abs() < 1e-6  # the same distribution: 0


@pytest.mark.parametrize("k", [1, 8, 49, 50])
@pytest.mark.parametrize("chunk", [None, 120])
def test_the_one_pass_loss_equals_its_slow_twin(k, chunk, monkeypatch):
    """cached_teacher_loss == (F.cross_entropy, coarse_kl): values and gradients, with tokens the teacher rules out
    and a student so sure of one token that the mass on the others underflows (exp(-300)); in one chunk of rows, or
    in chunks of 2 rows (120 elements)."""
    if chunk:
        monkeypatch.setattr(teacher_cache, "_ROWS", chunk)
    g = torch.Generator().manual_seed(1)
    teacher, logits = torch.randn(2, 7, 50, generator=g) * 3, torch.randn(2, 7, 50, generator=g) * 3
    teacher[0, 0, :5] = float("-inf")
    logits[1, 2, 3] = 300.0
    labels, targets = torch.randint(0, 50, (2, 7), generator=g), top_k_targets(teacher, k)
    slow = logits.clone().requires_grad_()
    lm, kl = F.cross_entropy(slow.reshape(-1, 50), labels.reshape(-1)), coarse_kl(slow, targets)
    (slow_grad,) = torch.autograd.grad(lm + 0.7 * kl, slow)
    fast = logits.clone().requires_grad_()
    fast_lm, fast_kl = cached_teacher_loss(fast, labels, targets)
    (fast_grad,) = torch.autograd.grad(fast_lm + 0.7 * fast_kl, fast)
    torch.testing.assert_close((fast_lm, fast_kl), (lm, kl), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [0, 2])
def test_cached_teacher_at_full_vocabulary_follows_the_live_loss_curve(tmp_path, tokenizer, lora):
    live = finetune_model(converted(tokenizer), blocks(), tmp_path / "live", config(), tokenizer=tokenizer,
                          method=Finetuning(lora=lora, kd=1.0))
    method = Finetuning(lora=lora, kd=1.0, kd_top_k=len(tokenizer), teacher_cache=tmp_path / "cache")
    cached = finetune_model(converted(tokenizer), blocks(), tmp_path / "cached", config(), tokenizer=tokenizer,
                            method=method)
    for a, b in zip(losses(tmp_path / "live"), losses(tmp_path / "cached"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    assert cached["eval_after"]["nll"] == pytest.approx(live["eval_after"]["nll"], abs=1e-4)
    assert cached["teacher_cache"]["blocks_computed"] == 6 and cached["teacher_cache"]["blocks_read"] == 0


def test_a_second_run_reads_the_cache_and_a_new_teacher_or_new_data_is_computed(tmp_path, tokenizer):
    student = converted(tokenizer)
    teacher, calls = counted(t2r.adapters.original_model(student))

    def run(name, data=None, teacher=teacher):
        method = Finetuning(lora=2, kd=1.0, teacher=teacher, kd_top_k=16, teacher_cache=tmp_path / "cache")
        data = blocks() if data is None else data
        return finetune_model(converted(tokenizer), data, tmp_path / name, config(), tokenizer=tokenizer, method=method)

    first = run("first")
    assert sum(calls) == 6 and first["teacher_cache"]["blocks_computed"] == 6  # 3 steps x 2 blocks: one epoch
    calls.clear()
    second = run("second")
    assert calls == [] and second["teacher_cache"]["blocks_read"] == 6
    assert [r["loss"] for r in losses(tmp_path / "first")] == [r["loss"] for r in losses(tmp_path / "second")]
    run("new-data", data=blocks(seed=1))
    assert sum(calls) == 6
    calls.clear()
    other, other_calls = counted(t2r.adapters.original_model(student))
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    third = run("new-teacher", teacher=other)
    assert calls == [] and sum(other_calls) == 6 and third["teacher_cache"]["dir"] != first["teacher_cache"]["dir"]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one folder per teacher (and k)


def test_an_interrupted_fill_leaves_no_shard_read_as_complete(tmp_path, tokenizer, monkeypatch, caplog):
    teacher, calls = counted(t2r.adapters.original_model(converted(tokenizer)))
    data = blocks().train
    reference = TeacherCache(teacher, tmp_path / "reference", 8).targets(data)
    cache = TeacherCache(teacher, tmp_path / "cache", 8)
    save, saved = teacher_cache.save_file, []

    def interrupted(tensors, path, metadata=None):
        if len(saved) == 2:  # the third shard: half of it is on disk when Ctrl-C comes
            save(tensors, path, metadata)
            written = Path(path).read_bytes()
            Path(path).write_bytes(written[: len(written) // 2])
            raise KeyboardInterrupt
        save(tensors, path, metadata)
        saved.append(path)

    monkeypatch.setattr(teacher_cache, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(data, batch_size=6)
    monkeypatch.undo()
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted(
        ["manifest.json", *(f"{block_name(row)}.safetensors" for row in data[:2])])  # no temporary file is left
    (cache.folder / f".{block_name(data[2])}.safetensors.x.tmp").write_bytes(b"a crash left this")  # kill -9
    calls.clear()
    again = TeacherCache(teacher, tmp_path / "cache", 8)
    assert again.fill(data, batch_size=6)["blocks_computed"] == 4 and sum(calls) == 4
    for got, want in zip(vars(again.targets(data)).values(), vars(reference).values()):
        torch.testing.assert_close(got, want)
    # a damaged shard: a warning, and it is computed again
    (again.folder / f"{block_name(data[3])}.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="t2r.stages.teacher_cache"):
        got = again.targets(data[2:5])
    assert sum(calls) == 1 and "is damaged" in caplog.text and "recomputing" in caplog.text
    torch.testing.assert_close(got.logp, reference.logp[2:5])


def test_resume_with_the_cache_equals_uninterrupted(tmp_path, tokenizer):
    class Crash(Exception):
        pass

    def crash(out):
        def on_step(step, record):
            if step == 3:
                assert recorded_settings(out)["kd_top_k"] == 16  # recorded with the run (checkpoint at step 2)
                raise Crash
        return on_step

    method = Finetuning(lora=2, kd=0.5, kd_top_k=16, teacher_cache=tmp_path / "cache")
    cfg = config(steps=5, checkpoint_every=2)

    def run(name, **kw):
        return finetune_model(converted(tokenizer), blocks(), tmp_path / name, cfg, tokenizer=tokenizer,
                              **{"method": method, **kw})

    run("a")
    with pytest.raises(Crash):
        run("b", on_step=crash(tmp_path / "b"))
    run("b", resume=True)
    a, b = t2r.load(tmp_path / "a").state_dict(), t2r.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Crash):
        run("c", on_step=crash(tmp_path / "c"))
    with pytest.raises(T2RError, match="kd_top_k: 16 -> None"):  # the live teacher does not continue a cached run
        run("c", method=Finetuning(lora=2, kd=0.5), resume=True)


def test_bad_inputs(tmp_path, tokenizer):
    model = converted(tokenizer)
    teacher = t2r.adapters.original_model(model)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(T2RError, match="cannot be written.*--teacher-cache"):
        TeacherCache(teacher, tmp_path / "a-file" / "cache", 8)
    with pytest.raises(T2RError, match="cannot be written.*--teacher-cache"):
        finetune_model(model, blocks(), tmp_path / "o1", config(),
                       method=Finetuning(kd=1.0, kd_top_k=8, teacher_cache=tmp_path / "a-file"))
    with pytest.raises(T2RError, match=f"vocabulary \\({len(tokenizer)}\\)"):
        TeacherCache(teacher, tmp_path / "cache", len(tokenizer) + 1)
    with pytest.raises(T2RError, match="add --kd"):
        finetune_model(model, blocks(), tmp_path / "o2", config(), method=Finetuning(kd_top_k=8))
    with pytest.raises(SettingsError, match="kd_top_k caches the teacher"):
        FinetuneSettings.parse({"kd_top_k": 8})
    with pytest.raises(SettingsError, match="set kd_top_k"):
        FinetuneSettings.parse({"kd": 1, "teacher_cache": "x"})
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2))


def test_command_line_and_pipeline(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20)
    assert main(["finetune", str(tiny_model_dir), "--data", str(text), "--block-size", "32", "--steps", "2",
                 "--eval-blocks", "1", "--kd", "1", "--kd-top-k", "8", "--teacher-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "ft"), "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["teacher_cache"]["top_k"] == 8 and result["teacher_cache"]["blocks_computed"] == 2
    recipe = {"name": "tiny", "model": str(tiny_model_dir), "data": str(text), "block_size": 32,
              "convert": {"feature_map": "elu"}, "finetune": {"steps": 2, "lora": 2, "kd": 1, "kd_top_k": 8,
                                                              "eval_every": 0, "eval_blocks": 1},
              "eval": {"data": [str(text)], "context": 32, "max_blocks": 1},
              "generate": {"prompt": "It is", "max_new_tokens": 2}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "finetune" / "stage.json").read_text())
    assert record["settings"]["finetune"]["kd_top_k"] == 8
    assert len(list((tmp_path / "run" / ".teacher-cache").glob("*/*.safetensors"))) == 2
