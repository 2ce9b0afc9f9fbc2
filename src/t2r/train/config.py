"""Optimisation settings of a training run: the token budget, the learning-rate schedule and the data order.

Data order: epoch e visits the train blocks in `torch.randperm(N, generator=seed + e)` order; optimizer step s,
micro-batch m, process r reads stream positions ((s * accum + m) * world + r) * B ... + B. The position is a function
of the step, so resuming at step s with the same settings replays exactly what an uninterrupted run would have read.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import TrainError

if TYPE_CHECKING:
    import torch

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_tokens(spec: str | int) -> int:
    """A token budget: 300000, "300k", "1M", "1.5m", "2e5" -> int > 0."""
    if isinstance(spec, bool):
        raise TrainError(f"a token budget is a number of tokens like 300k or 1M, got {spec!r}")
    if isinstance(spec, int):
        value = spec
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmbg]?)\s*(?:tokens?)?\s*", str(spec).lower())
        if not m:
            raise TrainError(f"a token budget is a number of tokens like 300000, 300k or 1M, got {spec!r}")
        number = float(m[1]) * _UNITS[m[2]]
        if not math.isfinite(number):
            raise TrainError(f"a token budget must be a finite number of tokens, got {spec!r}")
        value = round(number)
    if value <= 0:
        raise TrainError(f"the token budget must be positive, got {spec!r}: nothing would be trained")
    return value


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator); torch is imported here, once settings are read."""
    import torch

    return hasattr(torch, "accelerator") and torch.accelerator.is_available()


def check_mixed_precision(mode: str) -> None:
    """Refuse mixed precision where there is no GPU."""
    if mode != "no" and not has_accelerator():
        raise TrainError(f"--mixed-precision {mode} pays on a GPU, and there is none here: on a CPU bfloat16 "
                         "matmuls run 6-20x slower than float32 (and float16 has no fast CPU kernels): leave it out "
                         "to train in float32")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run. `steps` (optimizer steps) wins over `tokens` when set; a token budget is
    rounded up to whole steps of batch_size * grad_accum * processes * block_size tokens. `warmup` < 1 is a fraction
    of the steps, >= 1 a number of steps; the cosine decays to `min_lr` times `lr`."""

    lr: float
    tokens: int | None = None
    steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    warmup: float = 0.05
    min_lr: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 100
    eval_blocks: int = 16
    checkpoint_every: int = 100
    seed: int = 0
    progress: bool = True
    mixed_precision: str = "no"  # no, bf16 or fp16 (accelerate's autocast; GPU only)
    eval_ends: bool = True  # evaluate before the first step and after the last (a pipeline does that itself)

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_blocks": self.eval_blocks}
        for name, value in positive.items():
            if not value > 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
        if self.steps is None and self.tokens is None:
            raise TrainError("give a budget: tokens or steps")
        if self.steps is not None and self.steps <= 0:
            raise TrainError(f"--steps must be positive, got {self.steps}: nothing would be trained")
        if self.tokens is not None and self.tokens <= 0:
            raise TrainError(f"the token budget must be positive, got {self.tokens}: nothing would be trained")
        for name in ("warmup", "weight_decay", "max_grad_norm", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr <= 1:
            raise TrainError(f"min_lr is a fraction of lr in [0, 1], got {self.min_lr!r}")

    def total_steps(self, tokens_per_step: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.tokens / tokens_per_step))

    def resume_settings(self) -> dict:
        """What must match for a resumed run to end where the uninterrupted one would (progress/eval may change)."""
        return {k: v for k, v in asdict(self).items() if k not in ("progress", "eval_every", "eval_blocks",
                                                                    "checkpoint_every", "eval_ends")}


def lr_factor(step: int, total: int, warmup: float, min_lr: float) -> float:
    """The multiplier of lr for optimizer step `step` (0-based): linear warmup, then cosine to `min_lr`."""
    warm = round(warmup) if warmup >= 1 else math.ceil(warmup * total)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class BlockStream:
    """Train blocks in a fresh seeded permutation each epoch: stream position -> block index."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks, self.seed = num_blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def indices(self, start: int, count: int) -> torch.Tensor:
        import torch  # here, so that the settings (and `t2r --help`) do not import torch

        out = []
        for p in range(start, start + count):
            epoch, i = divmod(p, self.num_blocks)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.num_blocks,
                                                     generator=torch.Generator().manual_seed(self.seed + epoch))}
            out.append(self._perms[epoch][i])
        return torch.stack(out)
