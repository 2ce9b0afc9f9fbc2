"""The run directory of a training run (`t2r.train.trainer`) and its checkpoints: checks, a lock, atomic writes, exact resume.

The run directory OUT:
    metrics.jsonl           one JSON record per optimizer step ("train") and per evaluation ("eval")
    checkpoint/             the last checkpoint while the run is unfinished (replaced atomically):
        trainable.safetensors   the trainable weights by name
        optimizer.safetensors   AdamW's state tensors, "<index>.<key>"
        rng-<rank>.safetensors  each process's torch RNG state (uint8)
        state.json              step, data position, scheduler, optimizer groups, the run's settings
    config.json, *.safetensors, tokenizer files: the final model (`t2r.save`), once finished
    train.json              the run summary, once finished (the checkpoint is removed then)

A checkpoint is safetensors + JSON only: the optimizer's state tensors go to safetensors by "<index>.<key>", its
other state and param groups to state.json, each process's RNG state to its own file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import T2RError, TrainError  # noqa: F401  (TrainError: defined with the other errors, so that
# the settings can raise it without importing torch)
from ..io import refuse_symlink, replace_dir, write_json, write_text

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
SUMMARY = "train.json"


# ----------------------------------------------------------------------------- the run directory


def check_run_dir(out: Path, *, resume: bool, overwrite: bool) -> tuple[Path | None, bool]:
    """Check OUT for a new or resumed run without touching it: (checkpoint to resume from or None, wipe OUT first).
    Every process runs this, so all of them raise the same error."""
    if out.is_symlink() and (resume or overwrite):
        refuse_symlink(out)
    checkpoint = find_checkpoint(out)
    finished = (out / SUMMARY).is_file()
    empty = not (out.exists() and any(out.iterdir()))
    is_run = finished or checkpoint is not None or (out / METRICS).is_file()
    if resume:
        if finished and checkpoint is None:
            raise TrainError(f"{out} holds a finished run ({SUMMARY}); nothing to resume: choose another --out")
        if checkpoint is not None:
            return checkpoint, False
        if not (empty or is_run):
            raise TrainError(f"{out} is not a t2r run directory: refusing to use it; choose another --out")
        log.info("no checkpoint in %s: starting from the beginning", out)
        return None, not empty  # a run that crashed before its first checkpoint: its metrics go
    if empty:
        return None, False
    if checkpoint is not None and not overwrite:
        raise TrainError(f"{out} holds an interrupted run: pass --resume to continue it, --overwrite to start "
                         "again, or choose another --out")
    if not overwrite:
        raise TrainError(f"{out} already exists and is not empty: choose another --out or pass --overwrite")
    if not is_run:
        raise TrainError(f"{out} is not a t2r run directory: refusing to delete it; choose another --out")
    return None, True


def find_checkpoint(out: Path) -> Path | None:
    """OUT/checkpoint, or the previous one if a crash hit the moment of replacing it."""
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        if (out / name / "state.json").is_file():
            return out / name
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records a crashed run wrote after its last checkpoint (the resumed run writes them again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in keep))


class RunLock:
    """An exclusive lock on OUT (a sibling file `.OUT.lock`, flock: released by the OS even after kill -9), so that
    two runs never write into one directory. A lock file left by a process that is gone (its flock went with it) is
    taken over with a warning naming that process."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = out, out.with_name(f".{out.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = self.path.read_text().strip() or "?"
            raise TrainError(f"another t2r run is writing to {self.out} (process {holder}): wait for it to end, "
                             "or choose another --out") from None
        stale = os.read(fd, 64).decode(errors="replace").strip()
        if stale:  # the file outlived its holder (kill -9, a crash): flock let go with it
            log.warning("taking over the stale run lock %s of process %s, which is gone", self.path, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(state: dict) -> tuple[dict, dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict, rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def set_rng(tensors: dict) -> None:
    """Put back RNG states read by `read_rng` (the trainer does it inside its own `fork_rng`)."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(accelerator, out: Path, named: list[tuple[str, nn.Parameter]], optimizer, scheduler,
                    state: dict) -> None:
    """Write OUT/checkpoint atomically: everything into .checkpoint.partial, then swap it into place."""
    partial, final = out / f".{CHECKPOINT}.partial", out / CHECKPOINT
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_tensors(), str(partial / f"rng-{accelerator.process_index}.safetensors"))
    opt_tensors, opt_rest = _optimizer_tensors(optimizer.state_dict())
    if main:
        save_file({n: p.detach().contiguous().cpu() for n, p in named}, str(partial / "trainable.safetensors"))
        save_file(opt_tensors, str(partial / "optimizer.safetensors"))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        write_json(partial / "state.json", {**state, "scheduler": sched, "optimizer": opt_rest,
                                             "trainable": [n for n, _ in named]})
    accelerator.wait_for_everyone()
    if main:
        replace_dir(partial, final)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, path: Path, named: list[tuple[str, nn.Parameter]], optimizer, scheduler) -> dict:
    """Restore weights, optimizer and schedule from `path`; returns state.json. The RNG states: `read_rng`."""
    state = json.loads((path / "state.json").read_text())
    names = [n for n, _ in named]
    if state["trainable"] != names:
        raise TrainError(f"{path} was written for other trainable parameters ({len(state['trainable'])} vs "
                         f"{len(names)}): resume with the same model and settings, or start a new --out")
    weights = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, param in named:
            param.copy_(weights[name])
    optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return state


def read_rng(accelerator, path: Path) -> dict:
    """This process's RNG states saved in the checkpoint `path` (see `set_rng`)."""
    rng = path / f"rng-{accelerator.process_index}.safetensors"
    return load_file(str(rng if rng.is_file() else path / "rng-0.safetensors"))


def recorded_settings(out: Path) -> dict | None:
    """The settings recorded by the interrupted run in OUT (its checkpoint's), or None if it has no checkpoint."""
    checkpoint = find_checkpoint(out)
    return json.loads((checkpoint / "state.json").read_text())["settings"] if checkpoint else None
