"""The trainer shared by attention transfer (stage 1, `t2r.distill`) and finetuning (stage 2, `t2r.finetune`).

A stage hands over a `Task`: a module whose `forward(input_ids [B, T])` returns {"loss": scalar, ...metrics}, plus a
held-out evaluation and an export. The trainer owns the rest: AdamW, linear warmup + cosine decay, gradient clipping
and accumulation, a token or step budget, a progress bar, `metrics.jsonl` (and TensorBoard when importable), periodic
held-out evaluation, atomic safetensors checkpoints with exact resume, Ctrl-C and NaN handling. It runs under
`accelerate`: one process, or DDP (`torchrun --nproc_per_node 2 -m t2r ...`, `accelerate launch --multi_gpu ...`;
on CPU too). FSDP / DeepSpeed are refused with a clear error (`check_distributed`): checkpoints and exports here read
whole parameters, and no GPU was at hand to build and test the sharded path. There is no hand-written distributed
code here beyond giving each process its share of every batch.

The run directory OUT and its checkpoints: see `t2r.checkpoint`.

Data order: see `t2r.train.config`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..budget import activation_bytes, require_memory
from ..io import write_json
from ..rng import seeded
from .checkpoint import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    RunLock,
    TrainError,
    check_run_dir,
    load_checkpoint,
    read_rng,
    save_checkpoint,
    set_rng,
    truncate_metrics,
)
from .config import BlockStream, TrainConfig, check_mixed_precision, has_accelerator, lr_factor
from .plot import plot_metrics

log = logging.getLogger(__name__)


class NonFiniteLossError(TrainError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Task:
    """What a stage gives the trainer. `module.forward(input_ids)` returns {"loss": scalar, **metrics} where each
    metric is a detached scalar or 1-D tensor ("lm_loss" is shown as perplexity). Its parameters with
    `requires_grad` are the ones trained."""

    module: nn.Module

    def evaluate(self, module: nn.Module, heldout: torch.Tensor) -> dict:
        """Held-out metrics of the (unwrapped) module on blocks [N, T]; JSON-able."""
        return {}

    def export(self, module: nn.Module, out: Path) -> None:
        """Write the final model to the empty directory `out` (with `t2r.save` or `save_pretrained`)."""
        raise NotImplementedError


def make_accelerator(mixed_precision: str = "no"):
    """An `Accelerator`, told when there is no GPU (so that CPU processes under torchrun form a gloo DDP group
    instead of each training alone); `mixed_precision` (bf16, fp16) needs a GPU."""
    check_mixed_precision(mixed_precision)
    has_device = has_accelerator()
    if not has_device and any(os.environ.get(f"ACCELERATE_USE_{k}", "").lower() in ("1", "true")
                              for k in ("FSDP", "DEEPSPEED")):
        log.warning("no GPU here: accelerate runs this FSDP / DeepSpeed configuration as plain DDP on the CPUs")
    accelerator = Accelerator(cpu=not has_device, mixed_precision=mixed_precision)
    check_distributed(accelerator)
    return accelerator


def check_distributed(accelerator) -> None:
    """Refuse the sharded modes the trainer has not been tested under. Its checkpoints and exports read whole,
    unsharded parameters: with FSDP or DeepSpeed ZeRO they would save one process's shards. Those modes need a GPU,
    and none was available to test them; DDP (one whole copy per process) is what runs and is tested."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise TrainError(f"accelerate is configured for {kind}, which t2r's trainer does not support yet (its "
                         "checkpoints would hold one process's shards): use DDP instead, e.g. `accelerate launch "
                         "--multi_gpu --num_processes N -m t2r ...`, or `accelerate config` without FSDP/DeepSpeed")


# ----------------------------------------------------------------------------- interruption


class _Interrupts:
    """Ctrl-C / SIGTERM set a flag (shared by all processes through accelerate's trigger); the loop checkpoints
    and stops after the current step. A second Ctrl-C stops at once (the previous checkpoint stays)."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.previous: dict = {}
        self.pending = False

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        self.accelerator.set_trigger()
        log.warning("interrupted: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return self.accelerator.check_trigger()


# ----------------------------------------------------------------------------- the loop


Callback = Callable[[int, dict], None]


class Trainer:
    """One run of a `Task` on token blocks into the run directory `out` (see the module docstring).

    `settings` are the stage's own options (model, data, losses): with the optimisation settings they must match
    for `resume=True` to continue a checkpoint. `on_step(step, record)` is called on every process after each
    optimizer step (and its checkpoint, if one was due)."""

    def __init__(self, task: Task, blocks, config: TrainConfig, out: str | Path, *, settings: dict,
                 resume: bool = False, overwrite: bool = False) -> None:
        self.accelerator = acc = make_accelerator(config.mixed_precision)
        self.task, self.config, self.out = task, config, Path(out)
        self.train_blocks, self.heldout = blocks.train, blocks.heldout
        if self.train_blocks.dim() != 2 or self.train_blocks.shape[0] == 0:
            raise TrainError(f"no train blocks to train on (shape {tuple(self.train_blocks.shape)})")
        num_blocks, self.block_size = self.train_blocks.shape
        self.tokens_per_step = config.batch_size * config.grad_accum * acc.num_processes * self.block_size
        self.total_steps = config.total_steps(self.tokens_per_step)
        hf_config = next((m.config for m in task.module.modules() if hasattr(getattr(m, "config", None),
                                                                            "num_hidden_layers")), None)
        if hf_config is not None:
            require_memory(activation_bytes(hf_config, config.batch_size * self.block_size), f"a micro-batch of {config.batch_size} blocks of "
                           f"{self.block_size} tokens", "choose a smaller --batch-size (and raise --grad-accum)",
                           device=str(acc.device))
        self.settings = json.loads(json.dumps({
            **settings, **config.resume_settings(), "processes": acc.num_processes, "block_size": self.block_size,
            "train_blocks": num_blocks, "total_steps": self.total_steps}))
        self.lock = RunLock(self.out).acquire() if acc.is_main_process else None
        try:
            checkpoint, wipe = check_run_dir(self.out, resume=resume, overwrite=overwrite)
            if wipe and acc.is_main_process:
                shutil.rmtree(self.out)
            acc.wait_for_everyone()
            self._setup(task, config, checkpoint, num_blocks)
        except BaseException:
            self.close()
            raise

    def _setup(self, task: Task, config: TrainConfig, checkpoint: Path | None, num_blocks: int) -> None:
        acc = self.accelerator
        self.named = [(n, p) for n, p in task.module.named_parameters() if p.requires_grad]
        if not self.named:
            raise TrainError("nothing to train: the model has no trainable parameters for this stage")
        optimizer = torch.optim.AdamW([p for _, p in self.named], lr=config.lr, weight_decay=config.weight_decay)
        total, warmup, min_lr = self.total_steps, config.warmup, config.min_lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, min_lr))
        self.model, self.optimizer = acc.prepare(task.module, optimizer)
        self.stream = BlockStream(num_blocks, config.seed)
        self.step, self.checkpoint_step, self.eval_before, self.rng = 0, None, None, None
        if checkpoint is not None:
            self._resume(checkpoint)
        self.train_seconds, self.trained_tokens = 0.0, 0

    def close(self) -> None:
        """Release OUT for other runs (also done at the end of `run`, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    def _resume(self, checkpoint: Path) -> None:
        saved = json.loads((checkpoint / "state.json").read_text())["settings"]
        diff = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {self.settings.get(k)!r}" for k in diff)
            raise TrainError(f"cannot resume {checkpoint}: settings differ from the interrupted run ({changes}); "
                             "resume with the same settings, or start a new --out")
        state = load_checkpoint(self.accelerator, checkpoint, self.named, self.optimizer, self.scheduler)
        self.rng = read_rng(self.accelerator, checkpoint)
        self.step = self.checkpoint_step = state["step"]
        self.eval_before = state.get("eval_before")
        if self.accelerator.is_main_process:
            truncate_metrics(self.out / METRICS, self.step)
        log.info("resuming %s at step %d of %d", self.out, self.step, self.total_steps)

    def run(self, on_step: Callback | None = None) -> dict:
        """Train to the budget, export the final model into OUT and return the run summary. The whole run draws
        from torch's RNG seeded by `config.seed` (or restored from the checkpoint) inside a fork: dropout and
        random-feature redraws are reproducible and resume exactly, and the caller's RNG state is left as it was."""
        try:
            with seeded(self.config.seed, self.accelerator.device):
                if self.rng is not None:
                    set_rng(self.rng)
                return self._run(on_step)
        finally:
            self.close()

    def _run(self, on_step: Callback | None) -> dict:
        acc, started = self.accelerator, time.perf_counter()
        self.resumed_from = self.step
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self.tensorboard = _tensorboard(self.out) if acc.is_main_process else None
        with _Interrupts(acc) as interrupts, self._progress_bar() as bar:
            if self.step == 0 and self.config.eval_ends:
                self.eval_before = self._evaluate(bar, "before training")
            while self.step < self.total_steps:
                record = self._train_step()
                bar.update(self.tokens_per_step)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "ppl") if k in record}, refresh=False)
                last = self.step >= self.total_steps  # the end evaluates and saves on its own
                if self.config.eval_every and self.step % self.config.eval_every == 0 and not last:
                    self._evaluate(bar, f"at step {self.step}")
                if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0 and not last:
                    self._checkpoint()
                if on_step is not None:
                    on_step(self.step, record)
                if interrupts.requested():
                    self._stop()
            eval_after = self._evaluate(bar, "after training") if self.config.eval_ends else None
        return self._finish(eval_after, time.perf_counter() - started)

    def _batch(self, micro: int) -> torch.Tensor:
        cfg, acc = self.config, self.accelerator
        start = ((self.step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index) * cfg.batch_size
        return self.train_blocks[self.stream.indices(start, cfg.batch_size)].to(acc.device)  # (B, T)

    def _train_step(self) -> dict:
        cfg, acc = self.config, self.accelerator
        started = time.perf_counter()
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            ids = self._batch(micro)
            with acc.no_sync(self.model) if micro < cfg.grad_accum - 1 else nullcontext():
                outputs = self.model(ids)
                acc.backward(outputs["loss"] / cfg.grad_accum)
            for key, value in outputs.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float().reshape(-1) / cfg.grad_accum
        metrics = self._reduce(totals)
        grad_norm = None
        if math.isfinite(metrics["loss"]) and cfg.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm))
        self._check_finite(metrics["loss"], grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - started
        self.train_seconds += seconds
        self.trained_tokens += self.tokens_per_step
        record = {"kind": "train", "step": self.step, "tokens": self.step * self.tokens_per_step, **metrics,
                  "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(self.tokens_per_step / seconds, 2)}
        if "lm_loss" in metrics:
            record["ppl"] = math.exp(min(metrics["lm_loss"], 50.0))
        self._log(record)
        return record

    def _reduce(self, totals: dict[str, torch.Tensor]) -> dict:
        """Mean over processes of every metric, in one all-reduce; scalars -> float, vectors -> list."""
        sizes = [v.numel() for v in totals.values()]
        flat = self.accelerator.reduce(torch.cat(list(totals.values())), "mean").cpu()
        parts = flat.split(sizes)
        return {k: float(p) if p.numel() == 1 else [round(float(x), 6) for x in p] for k, p in zip(totals, parts)}

    def _check_finite(self, loss: float, grad_norm: float | None) -> None:
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
        kept = (f"the last good checkpoint (step {self.checkpoint_step}) is kept in {self.out / CHECKPOINT}: "
                "continue from it with --resume and a lower --lr" if self.checkpoint_step is not None else
                "no checkpoint had been written yet: start again with a lower --lr")
        raise NonFiniteLossError(f"{what} at step {self.step + 1} of {self.total_steps}; the weights were not "
                                 f"updated, {kept}")

    def _evaluate(self, bar=None, phase: str = "") -> dict | None:
        """Held-out metrics (main process); the progress bar says what is running meanwhile."""
        acc, result = self.accelerator, None
        label = f"held-out evaluation ({phase})"
        if bar is not None and not bar.disable:
            bar.set_description(label, refresh=True)
        elif phase:
            log.info("%s", label)
        if acc.is_main_process:
            module = acc.unwrap_model(self.model)
            was_training = module.training
            module.eval()
            result = self.task.evaluate(module, self.heldout[: self.config.eval_blocks])
            module.train(was_training)
            self._log({"kind": "eval", "step": self.step, "tokens": self.step * self.tokens_per_step, **result})
        acc.wait_for_everyone()
        if bar is not None and not bar.disable:
            bar.set_description("training", refresh=True)
        return result

    def _checkpoint(self) -> None:
        state = {"step": self.step, "total_steps": self.total_steps, "tokens": self.step * self.tokens_per_step,
                 "blocks_read": self.step * self.tokens_per_step // self.block_size, "settings": self.settings,
                 "eval_before": self.eval_before}
        save_checkpoint(self.accelerator, self.out, self.named, self.optimizer, self.scheduler, state)
        self.checkpoint_step = self.step
        log.debug("checkpoint at step %d", self.step)

    def _stop(self) -> None:
        if self.checkpoint_step != self.step:
            self._checkpoint()
        log.warning("stopped at step %d of %d; the checkpoint is in %s: continue with --resume", self.step,
                    self.total_steps, self.out / CHECKPOINT)
        raise KeyboardInterrupt

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.out / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, float) and key not in ("step", "tokens"):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["tokens"])

    def _progress_bar(self):
        return tqdm(total=self.total_steps * self.tokens_per_step, initial=self.step * self.tokens_per_step,
                    desc="training", unit="tok", unit_scale=True, dynamic_ncols=True, leave=False, smoothing=0.1,
                    disable=not (self.config.progress and self.accelerator.is_main_process))

    def _finish(self, eval_after: dict | None, seconds: float) -> dict:
        acc = self.accelerator
        summary = {"out": str(self.out), "steps": self.step, "tokens": self.step * self.tokens_per_step,
                   "tokens_per_step": self.tokens_per_step, "processes": acc.num_processes,
                   "resumed_from_step": self.resumed_from or None, "seconds": round(seconds, 2),
                   "train_tokens_per_s": round(self.trained_tokens / self.train_seconds, 2)
                   if self.train_seconds else None,
                   "eval_before": self.eval_before, "eval_after": eval_after}
        if acc.is_main_process:
            self._export()
            plot = plot_metrics(self.out, title=str(self.out))
            if plot is not None:
                summary["plot"] = str(plot)
            write_json(self.out / SUMMARY, summary)
            for name in (CHECKPOINT, f".{CHECKPOINT}.old", f".{CHECKPOINT}.partial"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            if self.tensorboard is not None:
                self.tensorboard.close()
        acc.wait_for_everyone()
        return summary

    def _export(self) -> None:
        """The task writes the final model into OUT/.export; its files then move into OUT, config.json last."""
        staging = self.out / ".export"
        shutil.rmtree(staging, ignore_errors=True)
        self.task.export(self.accelerator.unwrap_model(self.model), staging)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
            target = self.out / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
        staging.rmdir()
        log.info("saved the final model to %s", self.out)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(task: Task, blocks, config: TrainConfig, out: str | Path, *, settings: dict, resume: bool = False,
          overwrite: bool = False, on_step: Callback | None = None) -> dict:
    """Run `task` on `blocks` (a `t2r.data.TokenBlocks`) to the budget of `config`; see `Trainer`."""
    return Trainer(task, blocks, config, out, settings=settings, resume=resume, overwrite=overwrite).run(on_step)
