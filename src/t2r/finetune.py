"""Stage 2, finetuning: the whole model (the T2R paper's recipe) or LoRA adapters via `peft`, with the language-model
loss and optionally a KL term to a teacher's next-token distribution.

    loss = CE(student logits, next tokens) + kd * KL(teacher || student)

LoRA (`lora` = rank > 0) adapts the q/k/v/o projections by default (`lora_modules` picks others) and keeps the
feature maps (and window mixing factors) trainable too; the adapters are merged into the weights when the final model
is exported, so OUT holds a plain t2r model that `t2r.load` reads. The teacher is the original softmax model rebuilt
from the student's starting weights (`t2r.adapters.original_model`), or another model with the same tokenizer.
A model that was never converted can be finetuned too (a baseline: the teacher finetuned on the same tokens).
"""

from __future__ import annotations

import copy
import logging
import re
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .distill import _budget, follow_device, load_training_data
from .errors import T2RError
from .train import Task, TrainConfig, check_run_dir, train

log = logging.getLogger(__name__)

DEFAULT_LR = {"lora": 2e-4, "full": 3e-5}
LORA_TARGETS = {  # adapter name -> (attention projections, peft's fan_in_fan_out for Conv1D layers)
    "llama": (r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)", False),
    "gpt2": (r".*\.attn\.(c_attn|c_proj)", True),
}


def _trainable_extra(name: str) -> bool:
    return ".feature_map." in name or name.endswith("window_logit")


def apply_lora(model: nn.Module, rank: int, modules: str = "", alpha: float | None = None) -> nn.Module:
    """Wrap `model` with peft LoRA adapters of rank `rank` (in place; returns the peft model). Only the adapters and
    the feature maps / window logits train. `modules`: comma-separated module names (e.g. "q_proj,v_proj"); empty:
    the family's attention projections."""
    from peft import LoraConfig, get_peft_model

    from .adapters import adapter_for

    default, fan_in_fan_out = LORA_TARGETS.get(adapter_for(model).name, LORA_TARGETS["llama"])
    names = [m.strip() for m in modules.split(",") if m.strip()]
    if names and not all(re.fullmatch(r"[A-Za-z_][\w.]*", n) for n in names):
        raise T2RError(f"--lora-modules takes comma-separated module names like q_proj,v_proj; got {modules!r}")
    targets = rf".*\.({'|'.join(re.escape(n) for n in names)})" if names else default
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=targets,
                        fan_in_fan_out=fan_in_fan_out, bias="none")
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise T2RError(f"cannot add LoRA adapters to {targets!r}: {err}") from err
    for name, param in peft_model.named_parameters():
        if _trainable_extra(name):
            param.requires_grad_(True)
    return peft_model


class LanguageModeling(nn.Module):
    """forward(input_ids [B, T]) -> {"loss", "lm_loss", ("kl")}: next-token CE of the student, plus `kd` times
    KL(teacher || student). The teacher is not a submodule (no gradients, not seen by optimizers or DDP)."""

    def __init__(self, student: nn.Module, *, teacher: nn.Module | None = None, kd: float = 0.0) -> None:
        super().__init__()
        self.student, self.kd = student, kd
        object.__setattr__(self, "teacher", teacher)

    def train(self, mode: bool = True) -> "LanguageModeling":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, input_ids: torch.Tensor) -> dict:
        logits = self.student(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        labels = input_ids[:, 1:]  # (B, T-1)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        out = {"loss": lm, "lm_loss": lm.detach()}
        if self.kd:
            follow_device(self.teacher, input_ids.device)
            with torch.no_grad():
                target = self.teacher(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                          reduction="none").sum(-1).mean()
            out.update(loss=lm + self.kd * kl, kl=kl.detach())
        return out


class FinetuneTask(Task):
    def __init__(self, module: LanguageModeling, tokenizer=None, *, merge_lora: bool = False) -> None:
        self.module, self.tokenizer, self.merge_lora = module, tokenizer, merge_lora

    def evaluate(self, module: LanguageModeling, heldout: torch.Tensor) -> dict:
        from .evaluate import perplexity

        result = perplexity(module.student, heldout, batch_size=1)
        return {"ppl": result["ppl"], "nll": result["nll"]}

    def export(self, module: LanguageModeling, out: Path) -> None:
        from .persistence import save

        model = module.student.merge_and_unload() if self.merge_lora else module.student
        save(model, out, self.tokenizer)


def default_teacher(student: nn.Module) -> nn.Module:
    """The original softmax model of a converted student (its starting weights); a frozen copy of a plain one."""
    from .adapters import is_converted, original_model

    return frozen(original_model(student) if is_converted(student) else copy.deepcopy(student))


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with no parameter requiring gradients (a teacher)."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, teacher: str) -> None:
    """Knowledge distillation compares distributions over the same token ids: the vocabularies must be equal."""
    if student_tokenizer is None or teacher_tokenizer is None:
        raise T2RError(f"cannot compare the tokenizers of the student and the teacher {teacher!r}: one has no "
                       "tokenizer files")
    a, b = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if a != b:
        differ = sum(1 for t in set(a) | set(b) if a.get(t) != b.get(t))
        raise T2RError(f"the teacher {teacher!r} uses another tokenizer than the student ({len(b)} vs {len(a)} "
                       f"tokens, {differ} differ): distillation needs the same vocabulary; pick a teacher from the "
                       "same model family, or leave --teacher out to use the student's own original model")


def finetune_model(student: nn.Module, blocks, out: str | Path, config: TrainConfig, *, tokenizer=None,
                   lora: int = 0, lora_modules: str = "", kd: float = 0.0, teacher: nn.Module | None = None,
                   settings: dict | None = None, resume: bool = False, overwrite: bool = False,
                   on_step=None) -> dict:
    """Stage 2 on a loaded model (changed in place; with LoRA, adapters are injected into it). The final model
    (LoRA merged) is saved to `out`. Returns the run summary (see `t2r.train.Trainer`)."""
    if isinstance(lora, bool) or not isinstance(lora, int) or lora < 0:
        raise T2RError(f"--lora is a LoRA rank >= 0 (0: full finetuning), got {lora!r}")
    if kd < 0:
        raise T2RError(f"--kd is a loss weight >= 0, got {kd}")
    if kd and teacher is None:
        teacher = default_teacher(student)
    if teacher is not None:
        s, t = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if s != t:
            raise T2RError(f"the teacher predicts {t} tokens, the student {s}: distillation needs the same vocabulary")
    torch.manual_seed(config.seed)  # LoRA's initial weights
    if lora:
        model = apply_lora(student, lora, lora_modules)
    else:
        model = student
        for param in model.parameters():
            param.requires_grad_(True)
    task = FinetuneTask(LanguageModeling(model, teacher=teacher if kd else None, kd=kd), tokenizer,
                        merge_lora=bool(lora))
    settings = {"stage": "finetune", "lora": lora, "lora_modules": lora_modules, "kd": kd, **(settings or {})}
    return train(task, blocks, config, out, settings=settings, resume=resume, overwrite=overwrite, on_step=on_step)


def _load_student(model: str):
    """(model, tokenizer): a converted directory with `t2r.load`, anything else through `t2r.sources`."""
    from .persistence import _is_t2r_dir, load, load_tokenizer
    from .sources import load_model

    if Path(model).is_dir() and _is_t2r_dir(Path(model)):
        student, tokenizer = load(model), load_tokenizer(model)
    else:
        student, tokenizer, _ = load_model(model)
    if tokenizer is None:
        raise T2RError(f"{model!r} has no tokenizer files: save it with its tokenizer (t2r convert does)")
    return student, tokenizer


def finetune(model: str, *, data: str = "austen", tokens: str = "300k", steps: int = 0, lora: int = 0,
             lora_modules: str = "", kd: float = 0.0, teacher: str | None = None, out: str = "runs/finetuned",
             lr: float | None = None, batch_size: int = 1, grad_accum: int = 1, warmup: float = 0.05,
             weight_decay: float = 0.0, max_grad_norm: float = 1.0, block_size: int | None = None,
             eval_every: int = 100, eval_blocks: int = 16, checkpoint_every: int = 100, seed: int = 0,
             resume: bool = False, overwrite: bool = False, progress: bool = True, json: bool = False) -> dict:
    """Stage 2, finetuning: the whole model, or LoRA adapters (merged on export), on the LM loss (+ KD to a teacher).

    Args:
        model: directory of a converted model (e.g. from `t2r distill`); a plain model also works (a baseline).
        data: training text: austen, kjv, pydocs, mix, a folder from `t2r data`, a text/.jsonl file or folder.
        tokens: token budget, e.g. 300k or 1M (rounded up to whole steps).
        steps: optimizer steps instead of --tokens (0: use --tokens).
        lora: LoRA rank (0: full finetuning); feature maps train too; adapters are merged into the saved model.
        lora_modules: comma-separated module names to adapt (default: the attention's q/k/v/o projections).
        kd: weight of KL(teacher || student) on next-token distributions, added to the LM loss (0: off).
        teacher: teacher model for --kd (HF directory, GGUF file); default: the student's own original model.
        out: run directory: metrics.jsonl, checkpoint/, then the final model.
        lr: peak learning rate of AdamW (default: 2e-4 with LoRA, 3e-5 for full finetuning).
        batch_size: blocks per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        warmup: warmup steps (a fraction of all steps if < 1).
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        block_size: tokens per block; unset: the prepared folder's, else 512.
        eval_every: evaluate on held-out blocks every this many steps (0: only before and after).
        eval_blocks: held-out blocks per evaluation.
        checkpoint_every: write a checkpoint every this many steps (0: only on Ctrl-C).
        seed: seed of the data order, LoRA's initial weights and the RNG.
        resume: continue the interrupted run in --out from its last checkpoint.
        overwrite: delete an earlier run in --out and start again.
        progress: show a progress bar on stderr.
        json: print the result as JSON.
    """
    if lora < 0:
        raise T2RError(f"--lora is a LoRA rank >= 0 (0: full finetuning), got {lora}")
    if teacher is not None and not kd:
        raise T2RError("--teacher is used only for distillation: add --kd WEIGHT (e.g. --kd 1)")
    config = TrainConfig(lr=lr or DEFAULT_LR["lora" if lora else "full"], **_budget(tokens, steps),
                         batch_size=batch_size, grad_accum=grad_accum, warmup=warmup, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, eval_every=eval_every, eval_blocks=eval_blocks,
                         checkpoint_every=checkpoint_every, seed=seed, progress=progress)
    check_run_dir(Path(out), resume=resume, overwrite=overwrite)  # before minutes of loading
    student, tokenizer = _load_student(model)
    teacher_model = None
    if teacher is not None:
        teacher_model, teacher_tokenizer = _load_student(teacher)
        check_same_tokenizer(tokenizer, teacher_tokenizer, teacher)
    blocks = load_training_data(data, tokenizer, block_size)
    started = time.perf_counter()
    settings = {"model": str(Path(model).resolve()) if Path(model).exists() else model, "data": data,
                "teacher": teacher}
    summary = finetune_model(student, blocks, out, config, tokenizer=tokenizer, lora=lora, lora_modules=lora_modules,
                             kd=kd, teacher=teacher_model, settings=settings, resume=resume, overwrite=overwrite)
    return {"model": model, "data": data, "stage": "finetune", "lora": lora, "kd": kd, **summary,
            "wall_seconds": round(time.perf_counter() - started, 2)}


def render_finetune(r: dict) -> str:
    """Human-readable text for `t2r finetune`."""
    how = f"LoRA rank {r['lora']} (merged)" if r["lora"] else "full finetuning"
    if r["kd"]:
        how += f" + KD {r['kd']}"
    before, after = r.get("eval_before") or {}, r.get("eval_after") or {}
    fmt = lambda e: f"{e['ppl']:.2f}" if e else "-"  # noqa: E731
    return (f"finetuned {r['model']} on {r['data']} ({how}) -> {r['out']}: {r['steps']} steps, {r['tokens']:,} tokens "
            f"in {r['seconds']} s ({r['train_tokens_per_s']} tokens/s while training, {r['processes']} process(es))\n"
            f"held-out perplexity: before {fmt(before)}, after {fmt(after)}")
