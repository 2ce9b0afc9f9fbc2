"""Stage 2, finetuning: the whole model (the T2R paper's recipe) or LoRA adapters via `peft`, with the language-model
loss and optionally a KL term to a teacher's next-token distribution.

    loss = CE(student logits, next tokens) + kd * KL(teacher || student)

LoRA (`lora` = rank > 0) adapts the q/k/v/o projections by default (`lora_modules` picks others) and keeps the
feature maps (and window mixing factors) trainable too; the adapters are merged into the weights when the final model
is exported, so OUT holds a plain t2r model that `t2r.load` reads. The teacher is the original softmax model rebuilt
from the student's starting weights (`t2r.adapters.original_model`), or another model with the same tokenizer.
With `kd_top_k` = k > 0 the teacher runs once per training block instead of once per step: its top-k next-token
log-probabilities (and the rest of its mass) are cached on disk (`t2r.stages.teacher_cache`) and the KL is taken over
those k + 1 outcomes.
A model that was never converted can be finetuned too (a baseline: the teacher finetuned on the same tokens).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import is_converted, original_model
from ..errors import T2RError
from ..evaluate import perplexity
from ..lora import apply_lora
from ..persistence import save
from ..train import FinetuneSettings, Task, TrainConfig, seeded, train
from ..transfer import follow_device
from .teacher_cache import TeacherCache, cached_teacher_loss, default_cache_dir, full_kl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finetuning:
    """What stage 2 trains and towards what: a LoRA rank (0: the whole model) and the modules it adapts, and the
    weight of the KL term to `teacher` (None with kd > 0: the student's own original model), live or, with
    `kd_top_k` > 0, its top-k distributions cached in `teacher_cache` (None: `.teacher-cache` beside the run)."""

    lora: int = 0
    lora_modules: str = ""
    kd: float = 0.0
    teacher: nn.Module | None = None
    kd_top_k: int = 0
    teacher_cache: str | Path | None = None
    checkpoint_layers: bool = False

    @classmethod
    def of(cls, settings: FinetuneSettings, teacher: nn.Module | None = None) -> Finetuning:
        return cls(lora=settings.lora, lora_modules=settings.lora_modules, kd=settings.kd, teacher=teacher,
                   kd_top_k=settings.kd_top_k, teacher_cache=settings.teacher_cache,
                   checkpoint_layers=settings.checkpoint_layers)


class LanguageModeling(nn.Module):
    """forward(input_ids [B, T]) -> {"loss", "lm_loss", ("kl")}: next-token CE of the student, plus `kd` times
    KL(teacher || student), from the live teacher or, given `cache`, from its cached top-k distributions (the KL
    over k + 1 outcomes). The teacher is not a submodule (no gradients, not seen by optimizers or DDP)."""

    def __init__(self, student: nn.Module, *, teacher: nn.Module | None = None, kd: float = 0.0,
                 cache: TeacherCache | None = None) -> None:
        super().__init__()
        self.student, self.kd, self.cache = student, kd, cache
        object.__setattr__(self, "teacher", cache.teacher if cache is not None else teacher)

    def train(self, mode: bool = True) -> LanguageModeling:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, input_ids: torch.Tensor) -> dict:
        logits = self.student(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        labels = input_ids[:, 1:]  # (B, T-1)
        if self.kd and self.cache is not None:
            lm, kl = cached_teacher_loss(logits, labels, self.cache.targets(input_ids))
            return {"loss": lm + self.kd * kl, "lm_loss": lm.detach(), "kl": kl.detach()}
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        out = {"loss": lm, "lm_loss": lm.detach()}
        if self.kd:
            follow_device(self.teacher, input_ids.device)
            with torch.no_grad():
                target = self.teacher(input_ids=input_ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            kl = full_kl(logits, target)
            out.update(loss=lm + self.kd * kl, kl=kl.detach())
        return out


class FinetuneTask(Task):
    def __init__(self, module: LanguageModeling, tokenizer=None, *, merge_lora: bool = False) -> None:
        self.module, self.tokenizer, self.merge_lora = module, tokenizer, merge_lora

    def evaluate(self, module: LanguageModeling, heldout: torch.Tensor) -> dict:
        result = perplexity(module.student, heldout, batch_size=1)
        return {"ppl": result["ppl"], "nll": result["nll"]}

    def export(self, module: LanguageModeling, out: Path) -> None:
        model = module.student.merge_and_unload() if self.merge_lora else module.student
        save(model, out, self.tokenizer)


def default_teacher(student: nn.Module) -> nn.Module:
    """The original softmax model of a converted student (its starting weights); a frozen copy of a plain one."""
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


def check_same_vocabulary(student: nn.Module, teacher: nn.Module, name: str) -> None:
    """Knowledge distillation compares the two models' logits position by position: their output sizes must match."""
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    if sizes[0] != sizes[1]:
        kinds = [m.config.model_type for m in (student, teacher)]
        raise T2RError(f"the teacher {name!r} ({kinds[1]}) predicts {sizes[1]} tokens, the student ({kinds[0]}) "
                       f"{sizes[0]}: distillation needs the same vocabulary; pick a teacher from the same model "
                       "family, or leave --teacher out to use the student's own original model")


def finetune_model(student: nn.Module, blocks, out: str | Path, config: TrainConfig, *, tokenizer=None,
                   method: Finetuning = Finetuning(), settings: dict | None = None, resume: bool = False,
                   overwrite: bool = False, on_step=None) -> dict:
    """Stage 2 on a loaded model (changed in place; with LoRA, adapters are injected into it, their initial weights
    drawn from `config.seed`). The final model (LoRA merged) is saved to `out`. `settings` are recorded with the
    run (see `t2r.train.Trainer`). Returns the run summary (with `method.kd_top_k`, the teacher cache's folder and
    how many blocks it computed and read)."""
    lora, lora_modules, kd, teacher = method.lora, method.lora_modules, method.kd, method.teacher
    _check_method(method)
    if kd and teacher is None:
        teacher = default_teacher(student)
    if teacher is not None:
        s, t = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if s != t:
            raise T2RError(f"the teacher predicts {t} tokens, the student {s}: distillation needs the same vocabulary")
    if method.checkpoint_layers:
        checkpoint_layers(student)
    cache = None
    if kd and method.kd_top_k:
        cache = TeacherCache(teacher, method.teacher_cache or default_cache_dir(out), method.kd_top_k)
    if lora:
        with seeded(config.seed, next(student.parameters()).device):
            model = apply_lora(student, lora, lora_modules)
    else:
        model = student
        for param in model.parameters():
            param.requires_grad_(True)
    task = FinetuneTask(LanguageModeling(model, teacher=teacher if kd else None, kd=kd, cache=cache), tokenizer,
                        merge_lora=bool(lora))
    top_k = {"kd_top_k": method.kd_top_k} if cache is not None else {}  # absent for a live teacher, as before it
    settings = {"stage": "finetune", "lora": lora, "lora_modules": lora_modules, "kd": kd, **top_k, **(settings or {})}
    summary = train(task, blocks, config, out, settings=settings, resume=resume, overwrite=overwrite, on_step=on_step)
    return {**summary, "teacher_cache": cache.report()} if cache is not None else summary


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (HF's gradient checkpointing, non-reentrant: it works with
    frozen embeddings under LoRA and gives the same gradients)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise T2RError(f"{type(model).__name__} does not support recomputing its layers (--checkpoint-layers): "
                       "train without it, or with shorter blocks")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _check_method(method: Finetuning) -> None:
    lora, top_k = method.lora, method.kd_top_k
    if isinstance(lora, bool) or not isinstance(lora, int) or lora < 0:
        raise T2RError(f"--lora is a LoRA rank >= 0 (0: full finetuning), got {lora!r}")
    if method.kd < 0:
        raise T2RError(f"--kd is a loss weight >= 0, got {method.kd}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise T2RError(f"--kd-top-k is a number of tokens >= 0 (0: run the teacher at every step), got {top_k!r}")
    if top_k and not method.kd:
        raise T2RError("--kd-top-k caches the teacher for distillation: add --kd WEIGHT (e.g. --kd 1)")
