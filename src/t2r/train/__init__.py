"""Training: the settings of a run (config.py: the trainer's `TrainConfig`; settings.py: the typed settings of the
command line and the recipes), the loop (trainer.py) and its run directory and checkpoints (checkpoint.py). The
stages that use it (attention transfer, finetuning, the pipeline) live in `t2r.stages`. Each name is imported on
first use (`t2r.lazy`): the settings do not need torch."""

from ..lazy import lazy_exports

_EXPORTS = {
    "seeded": "..rng", "Settings": "..settings", "SettingsError": "..settings",
    **dict.fromkeys(["CHECKPOINT", "METRICS", "SUMMARY", "RunLock", "TrainError", "check_run_dir"], ".checkpoint"),
    **dict.fromkeys(["BlockStream", "TrainConfig", "lr_factor", "parse_tokens"], ".config"),
    **dict.fromkeys(["DistillSettings", "FinetuneSettings", "TrainSettings"], ".settings"),
    **dict.fromkeys(["NonFiniteLossError", "Task", "Trainer", "check_distributed", "make_accelerator", "train"],
                    ".trainer"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
