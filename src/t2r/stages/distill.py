"""Stage 1, attention transfer: train only the feature maps (and mixer parameters such as the window mixing factors)
so that every converted layer's linear attention reproduces the softmax attention of the original model, layer by
layer. The objective is `t2r.transfer.AttentionTransfer`; the loop is `t2r.train`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..adapters import is_converted
from ..attention import is_conversion_parameter
from ..data import prepare_data, read_meta
from ..errors import T2RError
from ..evaluate import perplexity
from ..persistence import save
from ..train import Task, TrainConfig, train
from ..transfer import AttentionTransfer

log = logging.getLogger(__name__)


class DistillTask(Task):
    """Attention transfer as a trainer task: feature maps and mixer parameters (window factors, gates) train, everything
    else is frozen."""

    def __init__(self, student: nn.Module, tokenizer=None, *, attn_ce: float = 0.0) -> None:
        trainable = 0
        for name, param in student.named_parameters():
            param.requires_grad_(is_conversion_parameter(name))
            trainable += param.numel() if param.requires_grad else 0
        if not trainable:
            recipe = student.config.t2r
            raise T2RError(f"feature map {recipe['feature_map']!r} and mixer {recipe['mixer']!r} have no parameters: "
                           "nothing to distill; convert with a learned map (hedgehog, t2r, taylor) or a window")
        self.module = AttentionTransfer(student, attn_ce=attn_ce)
        self.tokenizer = tokenizer

    def evaluate(self, module: AttentionTransfer, heldout: torch.Tensor) -> dict:
        device = next(module.parameters()).device
        with torch.no_grad():
            outputs = [module(heldout[i:i + 1].to(device)) for i in range(heldout.shape[0])]
        errors = torch.stack([o["layer_errors"] for o in outputs]).mean(0)  # (layers,)
        result = perplexity(module.student, heldout, batch_size=1)
        return {"ppl": result["ppl"], "nll": result["nll"],
                "transfer_mse": sum(float(o["mse"]) for o in outputs) / len(outputs),
                "layer_errors": [round(float(x), 6) for x in errors]}

    def export(self, module: AttentionTransfer, out: Path) -> None:
        save(module.student, out, self.tokenizer)


def attention_transfer(student: nn.Module, blocks, out: str | Path, config: TrainConfig, *, tokenizer=None,
                       attn_ce: float = 0.0, settings: dict | None = None, resume: bool = False,
                       overwrite: bool = False, on_step=None) -> dict:
    """Stage 1 on a loaded converted model (changed in place); the final model is saved to `out`. Returns the
    run summary (see `t2r.train.Trainer`) plus the final per-layer transfer errors."""
    if not is_converted(student):
        raise T2RError("attention transfer needs a converted model: run `t2r convert` first")
    if attn_ce < 0:
        raise T2RError(f"--attn-ce is a loss weight >= 0, got {attn_ce}")
    task = DistillTask(student, tokenizer, attn_ce=attn_ce)
    settings = {"stage": "distill", "attn_ce": attn_ce, **(settings or {})}
    summary = train(task, blocks, config, out, settings=settings, resume=resume, overwrite=overwrite,
                    on_step=on_step)
    return summary


def load_training_data(data: str, tokenizer, block_size: int | None):
    """Token blocks of `data` (see `t2r.data`); a prepared folder keeps its block size, else 512."""
    if block_size is None:
        meta = read_meta(Path(data).expanduser()) if Path(data).expanduser().is_dir() else None
        block_size = int(meta["block_size"]) if meta else 512
    return prepare_data(data, tokenizer, block_size=block_size)
