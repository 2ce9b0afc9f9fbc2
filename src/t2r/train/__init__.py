"""Training: the settings of a run (config.py: the trainer's `TrainConfig`; settings.py: the typed settings of the
command line and the recipes), the loop (trainer.py) and its run directory and checkpoints (checkpoint.py). The
stages that use it (attention transfer, finetuning, the pipeline) live in `t2r.stages`."""

from ..rng import seeded
from ..settings import Settings, SettingsError
from .checkpoint import CHECKPOINT, METRICS, SUMMARY, RunLock, TrainError, check_run_dir
from .config import BlockStream, TrainConfig, lr_factor, parse_tokens
from .settings import DistillSettings, FinetuneSettings, TrainSettings
from .trainer import NonFiniteLossError, Task, Trainer, check_distributed, make_accelerator, train

__all__ = [
    "CHECKPOINT", "METRICS", "SUMMARY", "BlockStream", "DistillSettings", "FinetuneSettings", "NonFiniteLossError",
    "RunLock", "Settings", "SettingsError", "Task", "TrainConfig", "TrainError", "TrainSettings", "Trainer",
    "check_distributed", "check_run_dir", "lr_factor", "make_accelerator", "parse_tokens", "seeded", "train",
]
