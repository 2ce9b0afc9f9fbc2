"""kill -9 at several points of `t2r convert --out`, `t2r distill` and `t2r finetune` (issue 15): the output is the
previous complete state or the new one, never a mix, and `--resume` (or the same command again) ends with weights
torch.equal to an uninterrupted run. Each kill runs the real command in a subprocess that SIGKILLs itself at the
chosen point (a wrapper around the function that reaches it). Tiny models, CPU, seconds each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import t2r
import t2r.cli
from test_train import assert_same_weights

CONVERT = ["--feature-map", "t2r", "--feature-dim", "8"]
TRAIN = ["--steps", "6", "--checkpoint-every", "2", "--eval-every", "0", "--eval-blocks", "1", "--block-size", "16",
         "--lr", "0.003", "--no-progress"]

# the subprocess: wrap one function so that the process SIGKILLs itself at the chosen point, then run `t2r ARGV`
KILLER = """
import os, shutil, signal, sys, torch
torch.set_num_threads(1)
import t2r.cli, t2r.io, t2r.train.checkpoint as ckpt, t2r.train.trainer as trainer
from transformers import PreTrainedModel

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point, argv = sys.argv[1], sys.argv[2:]
real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, ckpt.save_file
calls = {{"n": 0}}

def replace(src, dst):
    real_replace(src, dst)
    if point == "between-renames" and str(dst).endswith({old!r}):
        die()  # the old directory moved aside, the new one not yet in place
    if point == "mid-export" and "/.export/" in str(src):
        die()  # one file of the final model moved into place, the others not

def rmtree(path, *a, **k):
    if point == "after-swap" and str(path).endswith({old!r}) and os.path.exists(path):
        die()  # the new directory in place, the old one not yet removed
    real_rmtree(path, *a, **k)

def save_file(tensors, filename, *a, **k):
    calls["n"] += 1
    if point == "mid-checkpoint" and calls["n"] == 5:  # the second checkpoint: its first files written
        with open(filename, "wb") as f:
            f.write(b"partial")
        die()
    real_save(tensors, filename, *a, **k)

real_pretrained = PreTrainedModel.save_pretrained
def save_pretrained(self, *a, **k):
    real_pretrained(self, *a, **k)
    if point == "after-write":
        die()  # the whole new model written beside --out, not moved in

os.replace, shutil.rmtree, ckpt.save_file = replace, rmtree, save_file
PreTrainedModel.save_pretrained = save_pretrained
sys.exit(t2r.cli.main(argv))
"""


def killed(point: str, old_name: str, *argv) -> None:
    """Run `t2r ARGV` in a subprocess that SIGKILLs itself at `point`; check that it did die there."""
    script = textwrap.dedent(KILLER.format(old=old_name))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, point, "-q", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def cli(*argv) -> None:
    assert t2r.cli.main(["-q", *map(str, argv)]) == 0


def state(path) -> dict:
    return dict(t2r.load(path).state_dict())


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, tiny_model_dir):
    """The previous model (seed 0) and the new one (seed 1) that `convert --overwrite` replaces it with."""
    root = tmp_path_factory.mktemp("kill-convert")
    cli("convert", tiny_model_dir, "--out", root / "old", *CONVERT, "--seed", "0")
    cli("convert", tiny_model_dir, "--out", root / "new", *CONVERT, "--seed", "1")
    old, new = state(root / "old"), state(root / "new")
    assert not same(old, new)
    return root, old, new


@pytest.mark.parametrize("point, expect", [("after-write", "old"), ("between-renames", "old"),
                                           ("after-swap", "new")])
def test_convert_overwrite_killed(tmp_path, tiny_model_dir, conversions, point, expect):
    root, old, new = conversions
    out = tmp_path / "rnn"
    cli("convert", tiny_model_dir, "--out", out, *CONVERT, "--seed", "0")
    killed(point, ".rnn.old", "convert", tiny_model_dir, "--out", out, *CONVERT, "--seed", "1", "--overwrite")
    assert same(state(out), {"old": old, "new": new}[expect])  # whole, never a mix (the load puts a moved-aside
    cli("convert", tiny_model_dir, "--out", out, *CONVERT, "--seed", "1", "--overwrite")  # model back first)
    assert same(state(out), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rnn"]  # no partial or old directory left behind


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill-text") / "text.txt"
    path.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 40)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_converted_dir, text):
    root = tmp_path_factory.mktemp("kill-whole")
    cli("distill", tiny_converted_dir, "--data", text, "--out", root / "distill", *TRAIN)
    cli("finetune", tiny_converted_dir, "--data", text, "--out", root / "finetune", *TRAIN)
    return {"distill": state(root / "distill"), "finetune": state(root / "finetune")}


@pytest.mark.parametrize("command, point", [("distill", "mid-checkpoint"), ("distill", "between-renames"),
                                            ("distill", "mid-export"), ("finetune", "between-renames"),
                                            ("finetune", "mid-export")])
def test_training_killed_then_resumed(tmp_path, tiny_converted_dir, text, uninterrupted, command, point):
    out = tmp_path / "run"
    killed(point, ".checkpoint.old", command, tiny_converted_dir, "--data", text, "--out", out, *TRAIN)
    assert not (out / "train.json").exists()  # not finished: the final model is never taken for a whole one
    cli(command, tiny_converted_dir, "--data", text, "--out", out, *TRAIN, "--resume")
    assert_same_weights(uninterrupted[command], state(out))



PIPELINE = """name: kill
model: {model}
data: {text}
block_size: 16
convert: {{feature_map: t2r, feature_dim: 8}}
distill: {{steps: 6, checkpoint_every: 2, eval_every: 0, eval_blocks: 1, lr: 0.003}}
finetune: {{steps: 4, checkpoint_every: 2, eval_every: 0, eval_blocks: 1, lr: 0.001}}
eval: {{data: [{text}], max_blocks: 1, batch_size: 1}}
generate: {{max_new_tokens: 2}}
"""


@pytest.mark.parametrize("point", ["mid-checkpoint", "between-renames", "mid-export"])
def test_pipeline_killed_then_rerun(tmp_path, tiny_model_dir, text, point):
    """kill -9 inside the pipeline's distill stage; running the recipe again resumes it and ends with the stages'
    weights torch.equal to an uninterrupted pipeline's."""
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(PIPELINE.format(model=tiny_model_dir, text=text))
    cli("pipeline", "--config", recipe, "--out", tmp_path / "whole")
    killed(point, ".checkpoint.old", "pipeline", "--config", recipe, "--out", tmp_path / "killed")
    assert not (tmp_path / "killed" / "pipeline.json").exists()
    cli("pipeline", "--config", recipe, "--out", tmp_path / "killed")
    for stage in ("converted", "distill", "finetune"):
        assert_same_weights(state(tmp_path / "whole" / stage), state(tmp_path / "killed" / stage))
