"""Training settings: the optimisation settings of a run (`TrainSettings`) and of its two stages (`DistillSettings`,
`FinetuneSettings`), one schema each (the base and its one-line errors: `t2r.settings`). The command line
(`t2r distill MODEL --tokens 4k`: one flag per field, help from the field's description) and a pipeline recipe
(`distill: {tokens: 4k}`) read the same models with the same defaults, and each stage turns its settings into the
trainer's `TrainConfig`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, field_validator, model_serializer, model_validator

from ..settings import Settings
from ..errors import TrainError
from .config import TrainConfig, check_mixed_precision, parse_tokens

MIXED_PRECISION = ("no", "bf16", "fp16")
DEFAULT_LR = {"lora": 2e-4, "full": 3e-5}  # finetuning's peak learning rate when none is given


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
    mixed_precision: str = Field("no", description="no, bf16 or fp16: run forward and backward under autocast on a "
                                                   "GPU (weights and optimizer state stay float32). Refused on a "
                                                   "CPU, where bfloat16 matmuls are 6-20x slower than float32.")

    remote_code: bool = Field(False, exclude=True, description="also save the final model's code with an auto_map, "
                                                               "so that plain transformers loads it without t2r, with "
                                                               "trust_remote_code=True (the Hub, lm-eval's own CLI); "
                                                               "off by default: running a model's code is a trust "
                                                               "decision for whoever loads it. Not recorded: it does "
                                                               "not change the run.")

    # settings added after pipeline runs were recorded: left out of a dump while they keep the old behaviour, so the
    # stage records of earlier runs still equal the recipe's
    UNRECORDED_AT: ClassVar[dict] = {"mixed_precision": "no"}

    @field_validator("mixed_precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in MIXED_PRECISION:
            raise ValueError(f"is one of {', '.join(MIXED_PRECISION)}, got {value!r}")
        try:
            check_mixed_precision(value)  # before a model is loaded
        except TrainError as err:
            raise ValueError(str(err).removeprefix(f"--mixed-precision {value} ")) from None
        return value

    @model_serializer(mode="wrap")
    def _old_defaults_unrecorded(self, handler) -> dict:
        data = handler(self)
        for key, old in self.UNRECORDED_AT.items():
            if data.get(key, old) == old:
                data.pop(key, None)
        return data

    def train_config(self, progress: bool = True) -> TrainConfig:
        """The trainer's config: `steps` when set, else the token budget."""
        budget = {"steps": self.steps} if self.steps else {"tokens": self.tokens}
        return TrainConfig(lr=self.lr, **budget, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           warmup=self.warmup, min_lr=self.min_lr, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, eval_every=self.eval_every, eval_blocks=self.eval_blocks,
                           checkpoint_every=self.checkpoint_every, seed=self.seed, progress=progress,
                           mixed_precision=self.mixed_precision)


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

    # kd_top_k 0 is the live teacher, as before the setting existed
    UNRECORDED_AT: ClassVar[dict] = {**TrainSettings.UNRECORDED_AT, "kd_top_k": 0}

    lr: float | None = Field(None, gt=0, description="peak learning rate of AdamW (default: 2e-4 with LoRA, 3e-5 "
                                                     "for full finetuning).")
    seed: int = Field(0, description="seed of the data order, LoRA's initial weights and the RNG.")
    lora: int = Field(0, description="LoRA rank (0: full finetuning); feature maps train too; adapters are merged "
                                     "into the saved model.")
    lora_modules: str = Field("", description="comma-separated module names to adapt (default: the attention's "
                                              "q/k/v/o projections).")
    kd: float = Field(0.0, ge=0, description="weight of KL(teacher || student) on next-token distributions, added "
                                             "to the LM loss (0: off).")
    kd_top_k: int = Field(0, ge=0, description="with --kd: compute the teacher once per training block and keep its "
                                               "top-k next-token log-probabilities on disk (beside --out), the KL "
                                               "taken over those k tokens and the rest; e.g. 64 (0: run the "
                                               "teacher at every step).")
    teacher_cache: str | None = Field(None, exclude=True, description="folder of the cached teacher for --kd-top-k "
                                                                      "(None: .teacher-cache beside --out); not "
                                                                      "recorded: it does not change the run.")
    checkpoint_layers: bool = Field(False, exclude=True, description="recompute each decoder layer in the backward "
                                                                     "pass instead of keeping its activations (long "
                                                                     "blocks: a fraction of the memory for about a "
                                                                     "third more time); not recorded: it does not "
                                                                     "change the run.")

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

    @model_validator(mode="after")
    def _top_k_needs_kd(self) -> FinetuneSettings:
        if self.kd_top_k and not self.kd:
            raise ValueError("kd_top_k caches the teacher for distillation: set kd too (e.g. kd 1)")
        if self.teacher_cache is not None and not self.kd_top_k:
            raise ValueError("teacher_cache is the folder of the cached teacher: set kd_top_k too (e.g. 64)")
        return self
