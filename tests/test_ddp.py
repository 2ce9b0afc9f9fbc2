"""A 2-process DDP run on CPU (torchrun, gloo, through accelerate): both stages finish, checkpoints are written by
the group, and both ranks end with bit-identical weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import t2r

SCRIPT = """
import hashlib, json, os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import t2r
from conftest import byte_tokenizer, tiny_model
from t2r.data import TokenBlocks
from t2r.stages.distill import attention_transfer
from t2r.stages.finetune import finetune_model
from t2r.train import TrainConfig

out, rank = {out!r}, int(os.environ["RANK"])
tok = byte_tokenizer()
g = torch.Generator().manual_seed(0)
blocks = TokenBlocks(torch.randint(3, 40, (8, 32), generator=g), torch.randint(3, 40, (2, 32), generator=g), {{}})
cfg = TrainConfig(lr=3e-3, steps=3, batch_size=1, grad_accum=2, eval_every=2, eval_blocks=1, checkpoint_every=2,
                  progress=False)

def digest(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode()); h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()

result = {{}}
for stage in ("distill", "finetune"):
    model = t2r.convert(tiny_model("llama", vocab_size=len(tok), initializer_range=0.1), feature_map="hedgehog",
                        feature_dim=8)
    start = digest(model)
    run = attention_transfer if stage == "distill" else finetune_model
    summary = run(model, blocks, os.path.join(out, stage), cfg, tokenizer=tok)
    result[stage] = {{"start": start, "end": digest(model), "processes": summary["processes"],
                     "tokens": summary["tokens"]}}
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as fh:
    json.dump(result, fh)
"""


def test_two_process_ddp_on_cpu(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for stage in ("distill", "finetune"):
        r0, r1 = ranks[0][stage], ranks[1][stage]
        assert r0["processes"] == r1["processes"] == 2
        assert r0["tokens"] == 3 * 2 * 2 * 32  # steps * accumulation * processes * block
        assert r0["end"] == r1["end"] != r0["start"]  # trained, and the same weights on both ranks
        saved = t2r.load(tmp_path / stage)
        h = hashlib.sha256()
        for name, tensor in sorted(saved.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.contiguous().numpy().tobytes())
        assert h.hexdigest() == r0["end"]  # the exported model is what the ranks hold
        assert not (tmp_path / stage / "checkpoint").exists()
        evals = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "eval"]
        assert [e["step"] for e in evals] == [0, 2, 3]


@pytest.mark.parametrize("mode", [["--multi_gpu"], ["--use_fsdp", "--fsdp_version", "2"]], ids=["ddp", "fsdp-config"])
def test_accelerate_launch_cli_on_cpu(tmp_path, tiny_converted_dir, mode):
    """The command a user types: `accelerate launch --multi_gpu --num_processes 2 -m t2r finetune ...` runs two CPU
    processes (accelerate hands them to torchrun); only the first one prints the summary. An FSDP configuration on a
    machine without GPUs runs as the same DDP (accelerate's choice), and t2r says so."""
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged, that a single man. " * 200)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "ft"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "t2r", "finetune", str(tiny_converted_dir), "--data", str(tmp_path / "text.txt"),
                           "--block-size", "32", "--steps", "3", "--eval-every", "0", "--out", str(out), "--json"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # one JSON document: rank 1 stays quiet
    assert summary["processes"] == 2 and summary["tokens"] == 3 * 2 * 32
    assert t2r.load(out).config.t2r["feature_map"]
    assert ("plain DDP" in proc.stderr) == ("--use_fsdp" in mode)
