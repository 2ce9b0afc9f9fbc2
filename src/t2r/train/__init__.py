"""Training: the settings of a run (config.py), the loop (trainer.py) and its run directory and checkpoints
(checkpoint.py). The stages that use it (attention transfer, finetuning, the pipeline) live in `t2r.stages`."""

from .checkpoint import CHECKPOINT, METRICS, SUMMARY, RunLock, TrainError, check_run_dir
from .config import BlockStream, TrainConfig, lr_factor, parse_tokens, seeded
from .trainer import NonFiniteLossError, Task, Trainer, check_distributed, make_accelerator, train

__all__ = [
    "CHECKPOINT", "METRICS", "SUMMARY", "BlockStream", "NonFiniteLossError", "RunLock", "Task", "TrainConfig",
    "TrainError", "Trainer", "check_distributed", "check_run_dir", "lr_factor", "make_accelerator", "parse_tokens",
    "seeded", "train",
]
