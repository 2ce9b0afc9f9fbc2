"""The trainer: budgets, schedule, data order, checkpoints (safetensors + JSON only), exact resume after a crash,
Ctrl-C and kill -9, the NaN guard, and run-directory errors. Tiny models, CPU, seconds."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import t2r
from conftest import tiny_model
from t2r.data import TokenBlocks
from t2r.errors import T2RError
from t2r.stages.finetune import Finetuning, finetune_model
from t2r.train import (
    METRICS,
    BlockStream,
    NonFiniteLossError,
    RunLock,
    TrainConfig,
    TrainError,
    check_distributed,
    lr_factor,
    parse_tokens,
)

STEPS = 6


def student(tokenizer, seed: int = 0):
    return t2r.convert(tiny_model("llama", seed=seed, vocab_size=len(tokenizer)), feature_map="hedgehog",
                       feature_dim=8)


def blocks(n_train: int = 12, n_heldout: int = 2, T: int = 32, seed: int = 0) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(3, 60, (n_train, T), generator=g)
    return TokenBlocks(train, torch.randint(3, 60, (n_heldout, T), generator=g), {})


def config(**kw) -> TrainConfig:
    base = dict(lr=3e-3, steps=STEPS, batch_size=2, grad_accum=2, eval_every=0, eval_blocks=2, checkpoint_every=2,
                progress=False)
    return TrainConfig(**{**base, **kw})


class Crash(Exception):
    pass


def crash_at(step: int):
    def on_step(s, record):
        if s == step:
            raise Crash
    return on_step


def weights(path) -> dict:
    return {k: v for k, v in t2r.load(path).state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("spec, tokens", [("300k", 300_000), ("1M", 1_000_000), ("1.5m", 1_500_000),
                                          ("2e5", 200_000), (" 25k tokens ", 25_000), (4096, 4096), ("512", 512)])
def test_parse_tokens(spec, tokens):
    assert parse_tokens(spec) == tokens


@pytest.mark.parametrize("spec", ["0", 0, "0k", "-5", "abc", "", "1x", True])
def test_parse_tokens_rejects(spec):
    with pytest.raises(TrainError):
        parse_tokens(spec)


def test_config_rejects_bad_values():
    for bad in (dict(steps=0), dict(tokens=0), dict(lr=0.0), dict(batch_size=0), dict(grad_accum=0),
                dict(steps=None, tokens=None), dict(warmup=-1)):
        with pytest.raises(TrainError):
            config(**bad)


def test_sharded_modes_are_refused_with_a_way_out():
    """FSDP / DeepSpeed would checkpoint one process's shards: they stop at once and name DDP instead."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(TrainError, match="--multi_gpu") as info:
            check_distributed(SimpleNamespace(distributed_type=kind))
        assert isinstance(info.value, T2RError)
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distributed(SimpleNamespace(distributed_type=kind))


def test_token_budget_rounds_up_to_whole_steps():
    assert TrainConfig(lr=1.0, tokens=1000).total_steps(tokens_per_step=512) == 2
    assert TrainConfig(lr=1.0, tokens=1000, steps=7).total_steps(tokens_per_step=512) == 7


def test_schedule_warms_up_then_decays_to_min_lr():
    factors = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(0, 10, 0, 0.0) == 1.0  # no warmup


def test_block_stream_visits_every_block_once_per_epoch():
    stream = BlockStream(10, seed=3)
    epoch0, epoch1 = stream.indices(0, 10), stream.indices(10, 10)
    assert sorted(epoch0.tolist()) == list(range(10)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(BlockStream(10, seed=3).indices(5, 10), torch.cat([epoch0[5:], epoch1[:5]]))


# ----------------------------------------------------------------------------- checkpoints and resume


def test_checkpoint_is_safetensors_and_json_only(tmp_path, tokenizer):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        finetune_model(student(tokenizer), blocks(), out, config(), tokenizer=tokenizer, on_step=crash_at(4))
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == ["optimizer.safetensors", "rng-0.safetensors", "state.json", "trainable.safetensors"]
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["blocks_read"] == 4 * 2 * 2
    with safe_open(str(out / "checkpoint" / "rng-0.safetensors"), "pt") as f:
        assert f.get_tensor("torch").dtype == torch.uint8
    with safe_open(str(out / "checkpoint" / "optimizer.safetensors"), "pt") as f:
        assert any(k.endswith(".exp_avg_sq") for k in f.keys())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resume_after_crash_ends_with_the_same_weights(tmp_path, tokenizer):
    """Uninterrupted N steps == k steps, crash, resume to N (grad accumulation, warmup, several epochs)."""
    cfg = config(steps=STEPS, warmup=2)
    finetune_model(student(tokenizer), blocks(), tmp_path / "a", cfg, tokenizer=tokenizer)
    with pytest.raises(Crash):
        finetune_model(student(tokenizer), blocks(), tmp_path / "b", cfg, tokenizer=tokenizer, on_step=crash_at(3))
    with pytest.raises(TrainError, match="--resume"):  # an interrupted run is never silently overwritten
        finetune_model(student(tokenizer), blocks(), tmp_path / "b", cfg, tokenizer=tokenizer)
    summary = finetune_model(student(tokenizer), blocks(), tmp_path / "b", cfg, tokenizer=tokenizer, resume=True)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == STEPS
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not (tmp_path / "b" / "checkpoint").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # the crashed run's step 3 was not recorded twice


def test_training_draws_from_its_own_seeded_rng(tmp_path, tokenizer):
    """Dropout and LoRA's initial weights draw from torch's RNG seeded by `config.seed` inside a fork: the caller's
    RNG state is left as it was, the result does not depend on it, and a crashed run resumes to the same weights
    (each checkpoint holds the run's RNG state)."""
    def dropout_student():
        model = tiny_model("gpt2", vocab_size=len(tokenizer), resid_pdrop=0.2, embd_pdrop=0.2)
        return t2r.convert(model, feature_map="hedgehog", feature_dim=8)

    students = [dropout_student() for _ in range(3)]
    lora = Finetuning(lora=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    finetune_model(students[0], blocks(), tmp_path / "a", config(), tokenizer=tokenizer, method=lora)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)
    with pytest.raises(Crash):
        finetune_model(students[1], blocks(), tmp_path / "b", config(), tokenizer=tokenizer, method=lora,
                       on_step=crash_at(3))
    torch.randn(10)  # the caller's RNG moves on between the two runs
    finetune_model(dropout_student(), blocks(), tmp_path / "b", config(), tokenizer=tokenizer, method=lora,
                   resume=True)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    finetune_model(students[2], blocks(), tmp_path / "c", config(seed=1), tokenizer=tokenizer, method=lora)
    a, c = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters: the RNG is really drawn from


def test_ctrl_c_writes_a_checkpoint_and_resume_matches(tmp_path, tokenizer):
    # Python's own Ctrl-C handler, even where this process was started in the background (a shell sets SIGINT to
    # "ignore" for background jobs, and Python then installs no handler of its own)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_then_resume(tmp_path, tokenizer)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_then_resume(tmp_path, tokenizer):
    cfg = config(checkpoint_every=0)
    finetune_model(student(tokenizer), blocks(), tmp_path / "a", cfg, tokenizer=tokenizer)

    def ctrl_c(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        finetune_model(student(tokenizer), blocks(), tmp_path / "b", cfg, tokenizer=tokenizer, on_step=ctrl_c)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was restored
    finetune_model(student(tokenizer), blocks(), tmp_path / "b", cfg, tokenizer=tokenizer, resume=True)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from conftest import byte_tokenizer
from test_train import blocks, config, student
from t2r.stages.finetune import Finetuning, finetune_model

def kill(step, record):
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)

tok = byte_tokenizer()
finetune_model(student(tok), blocks(), {out!r}, config(), tokenizer=tok, on_step=kill)
"""


def test_resume_after_kill_9(tmp_path, tokenizer):
    out = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    finetune_model(student(tokenizer), blocks(), out, config(), tokenizer=tokenizer, resume=True)
    finetune_model(student(tokenizer), blocks(), tmp_path / "whole", config(), tokenizer=tokenizer)
    assert_same_weights(weights(tmp_path / "whole"), weights(out))


def test_resume_refuses_other_settings(tmp_path, tokenizer):
    with pytest.raises(Crash):
        finetune_model(student(tokenizer), blocks(), tmp_path / "r", config(), tokenizer=tokenizer,
                       on_step=crash_at(2))
    with pytest.raises(TrainError, match="lr"):
        finetune_model(student(tokenizer), blocks(), tmp_path / "r", config(lr=1e-2), tokenizer=tokenizer,
                       resume=True)


def test_resume_without_checkpoint_starts_fresh_and_a_finished_run_is_kept(tmp_path, tokenizer):
    with pytest.raises(Crash):  # dies before its first checkpoint
        finetune_model(student(tokenizer), blocks(), tmp_path / "r", config(steps=2), tokenizer=tokenizer,
                       on_step=crash_at(1))
    summary = finetune_model(student(tokenizer), blocks(), tmp_path / "r", config(steps=2), tokenizer=tokenizer,
                             resume=True)
    assert summary["steps"] == 2 and summary["resumed_from_step"] is None
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / METRICS).read_text().splitlines()]
    assert steps == [0, 1, 2, 2]  # eval, train, train, eval: nothing left from the crashed attempt
    with pytest.raises(TrainError, match="finished"):
        finetune_model(student(tokenizer), blocks(), tmp_path / "r", config(steps=2), tokenizer=tokenizer,
                       resume=True)
    with pytest.raises(TrainError, match="overwrite"):
        finetune_model(student(tokenizer), blocks(), tmp_path / "r", config(steps=2), tokenizer=tokenizer)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for flags in (dict(overwrite=True), dict(resume=True)):
        with pytest.raises(TrainError, match="not a t2r run"):
            finetune_model(student(tokenizer), blocks(), tmp_path / "mine", config(steps=2), tokenizer=tokenizer,
                           **flags)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, tokenizer):
    model = student(tokenizer)

    def poison(step, record):
        if step == 3:
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="step 4 of 6") as err:
        finetune_model(model, blocks(), tmp_path / "nan", config(), tokenizer=tokenizer, on_step=poison)
    assert isinstance(err.value, T2RError) and "step 2" in str(err.value)
    state = json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    with safe_open(str(tmp_path / "nan" / "checkpoint" / "trainable.safetensors"), "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_metrics_and_periodic_eval(tmp_path, tokenizer):
    summary = finetune_model(student(tokenizer), blocks(), tmp_path / "m", config(eval_every=2), tokenizer=tokenizer)
    records = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4, 6]
    train = [r for r in records if r["kind"] == "train"]
    assert {"loss", "ppl", "lr", "grad_norm", "tokens_per_s", "tokens"} <= train[0].keys()
    assert train[-1]["tokens"] == summary["tokens"] == STEPS * 2 * 2 * 32
    assert math.isclose(train[0]["ppl"], math.exp(train[0]["lm_loss"]))
    assert json.loads((tmp_path / "m" / "train.json").read_text())["eval_after"] == summary["eval_after"]


def test_two_runs_never_share_a_directory(tmp_path, tokenizer):
    lock = RunLock(tmp_path / "busy").acquire()  # another run holds it
    try:
        with pytest.raises(TrainError, match="another t2r run"):
            finetune_model(student(tokenizer), blocks(), tmp_path / "busy", config(steps=1), tokenizer=tokenizer,
                           overwrite=True)
    finally:
        lock.release()
    finetune_model(student(tokenizer), blocks(), tmp_path / "busy", config(steps=1), tokenizer=tokenizer)
    assert not (tmp_path / ".busy.lock").exists()


def test_mixed_precision_is_refused_on_a_cpu_before_any_model_loads(capsys, tmp_path):
    """bf16 / fp16 autocast is for GPUs: on this CPU-only machine the flag is refused from the settings alone, in one
    line that says why; its default is left out of a stage's record (earlier pipeline runs still match)."""
    import t2r.cli
    from t2r.train.settings import DistillSettings, FinetuneSettings

    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        pytest.skip("a GPU is present: mixed precision is allowed here")
    code = t2r.cli.main(["finetune", str(tmp_path / "no-model"), "--data", "x.txt", "--out", str(tmp_path / "o"),
                         "--mixed-precision", "bf16"])
    err = capsys.readouterr().err
    assert code == 2 and "pays on a GPU" in err and "6-20x slower" in err and len(err.strip().splitlines()) == 1
    code = t2r.cli.main(["distill", str(tmp_path / "no-model"), "--mixed-precision", "int4"])
    assert code == 2 and "is one of no, bf16, fp16" in capsys.readouterr().err
    assert "mixed_precision" not in FinetuneSettings().model_dump()
    assert "mixed_precision" not in DistillSettings().model_dump() and "kd_top_k" not in FinetuneSettings().model_dump()
    assert DistillSettings().train_config().mixed_precision == "no"
