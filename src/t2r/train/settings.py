"""Typed settings: the optimisation settings of a training run (`TrainSettings`) and of its two stages
(`DistillSettings`, `FinetuneSettings`), one schema each. The command line (`t2r distill MODEL --tokens 4k`: one flag
per field, help from the field's description) and a pipeline recipe (`distill: {tokens: 4k}`) read the same models
with the same defaults, and each stage turns its settings into the trainer's `TrainConfig`.

A settings model refuses an unknown key or a value of the wrong type or range with one line naming the key
(`SettingsError`, which the CLI prints as `t2r CMD: error: ...` with exit code 2)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import T2RError
from .checkpoint import TrainError
from .config import TrainConfig, parse_tokens

DEFAULT_LR = {"lora": 2e-4, "full": 3e-5}  # finetuning's peak learning rate when none is given


class SettingsError(T2RError, ValueError):
    """Settings with an unknown key, or a value of the wrong type or out of range; the message names the key."""


def model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`X`, `X | None`), or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_path(model: type[BaseModel], loc: tuple) -> tuple[list, type[BaseModel] | None]:
    """The part of an error location that names fields (list indices included, union member tags dropped), and the
    model the last one holds."""
    path, cls = [], model
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            continue
        if cls is None or part not in cls.model_fields:
            break
        path.append(part)
        cls = model_in(cls.model_fields[part].annotation)
    return path, cls


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error["type"] in ("missing", "value_error", "assertion_error"):
        return msg
    return f"{msg} (got {_short(error['input'])})"


def dotted(path: list) -> str:
    """distill.tokens: a key as a recipe file writes it."""
    return ".".join(str(p) for p in path)


def flag(path: list) -> str:
    """--batch-size: a key as the command line writes it."""
    return "--" + str(path[-1]).replace("_", "-")


def describe_errors(err: ValidationError, model: type[BaseModel], name: Callable[[list], str] = dotted) -> str:
    """One line for every error of a validation: `key: what is wrong (got VALUE)`, joined by '; '."""
    messages: dict[str, list[str]] = {}
    for error in err.errors(include_url=False):
        path, cls = _field_path(model, error["loc"])
        if error["type"] == "extra_forbidden":
            key = name([*path, error["loc"][len(path)]])
            text = "unknown setting" + (f"; known: {', '.join(cls.model_fields)}" if cls else "")
        else:
            key, text = (name(path) if path else ""), _message(error)
        if text not in messages.setdefault(key, []):
            messages[key].append(text)
    return "; ".join(f"{key}: {' or '.join(texts)}" if key else " or ".join(texts) for key, texts in messages.items())


class Settings(BaseModel):
    """Base of every settings model: unknown keys are refused, values are checked when made and never change.
    Made in Python (`DistillSettings(lr=0.01)`), a bad value raises pydantic's `ValidationError` (a ValueError);
    `parse` raises a one-line `SettingsError` instead."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, coerce_numbers_to_str=True)

    @classmethod
    def parse(cls, values: dict, name: Callable[[list], str] = dotted):
        """Validate `values` (strings are converted: "0.01" -> 0.01); errors in one line naming each key with
        `name` (`dotted` as a recipe file writes it, `flag` as the command line does)."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise SettingsError(describe_errors(err, cls, name)) from None


def _token_budget(value: Any) -> int:
    try:
        return parse_tokens(value)
    except TrainError as err:
        raise ValueError(str(err)) from None


TokenBudget = Annotated[int, BeforeValidator(_token_budget)]  # 300000, "300k", "1M", "1.5m", "2e5"


class TrainSettings(Settings):
    """Optimisation settings of a training run."""

    tokens: TokenBudget = Field("300k", description="token budget, e.g. 300k or 1M (rounded up to whole steps).")
    steps: int = Field(0, ge=0, description="optimizer steps instead of --tokens (0: use --tokens).")
    lr: float = Field(gt=0, description="peak learning rate of AdamW (linear warmup, then cosine decay to a tenth "
                                        "of it).")
    batch_size: int = Field(1, gt=0, description="blocks per micro-batch per process.")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step.")
    warmup: float = Field(0.05, ge=0, description="warmup steps (a fraction of all steps if < 1).")
    min_lr: float = Field(0.1, ge=0, le=1, description="the cosine decays to this fraction of --lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: no clipping).")
    eval_every: int = Field(100, ge=0, description="evaluate on held-out blocks every this many steps (0: only "
                                                   "before and after).")
    eval_blocks: int = Field(16, gt=0, description="held-out blocks per evaluation.")
    checkpoint_every: int = Field(100, ge=0, description="write a checkpoint every this many steps (0: only on "
                                                         "Ctrl-C).")
    seed: int = Field(0, description="seed of the data order and of the RNG.")

    def train_config(self, progress: bool = True) -> TrainConfig:
        """The trainer's config: `steps` when set, else the token budget."""
        budget = {"steps": self.steps} if self.steps else {"tokens": self.tokens}
        return TrainConfig(lr=self.lr, **budget, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           warmup=self.warmup, min_lr=self.min_lr, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, eval_every=self.eval_every, eval_blocks=self.eval_blocks,
                           checkpoint_every=self.checkpoint_every, seed=self.seed, progress=progress)


class DistillSettings(TrainSettings):
    """Stage 1, attention transfer (`t2r distill`, a recipe's `distill:`)."""

    lr: float = Field(3e-2, gt=0, description="peak learning rate of AdamW (linear warmup, then cosine decay to a "
                                              "tenth of it).")
    eval_every: int = Field(250, ge=0, description="evaluate on held-out blocks every this many steps (0: only "
                                                   "before and after).")
    eval_blocks: int = Field(8, gt=0, description="held-out blocks per evaluation (each costs two forward passes: "
                                                  "transfer error and perplexity).")
    attn_ce: float = Field(0.0, ge=0, description="weight of Hedgehog's cross-entropy between attention rows "
                                                  "(quadratic memory in the block size).")


class FinetuneSettings(TrainSettings):
    """Stage 2, finetuning (`t2r finetune`, a recipe's `finetune:` and `teacher_finetune:`)."""

    lr: float | None = Field(None, gt=0, description="peak learning rate of AdamW (default: 2e-4 with LoRA, 3e-5 "
                                                     "for full finetuning).")
    seed: int = Field(0, description="seed of the data order, LoRA's initial weights and the RNG.")
    lora: int = Field(0, description="LoRA rank (0: full finetuning); feature maps train too; adapters are merged "
                                     "into the saved model.")
    lora_modules: str = Field("", description="comma-separated module names to adapt (default: the attention's "
                                              "q/k/v/o projections).")
    kd: float = Field(0.0, ge=0, description="weight of KL(teacher || student) on next-token distributions, added "
                                             "to the LM loss (0: off).")

    @field_validator("lora")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be a LoRA rank >= 0 (0: full finetuning), got {value}")
        return value

    @model_validator(mode="after")
    def _lr_by_method(self) -> FinetuneSettings:
        if self.lr is None:  # frozen: the one value filled in after validation
            object.__setattr__(self, "lr", DEFAULT_LR["lora" if self.lora else "full"])
        return self
