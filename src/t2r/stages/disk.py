"""A pipeline's disk use: what each stage directory holds (a stage saved as changes over its parent, see
`t2r.stages.delta`, or whole) against what it would hold saved whole, and the run's total. Also the two rules the
pipeline applies to its stages: which one is the final model (saved whole), and that its training stages leave the
held-out evaluation before and after training to the pipeline, which evaluates each stage's model once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..train import TrainConfig
from ..units import fmt_bytes
from .delta import is_delta_dir, read_delta, weight_files, whole_weight_bytes
from .records import active_stages


def final_stage(recipe) -> str:
    """The stage whose model the recipe delivers (the last one built on the conversion): it is saved whole."""
    return [stage for stage in active_stages(recipe) if stage != "teacher-finetune"][-1]


def without_end_evaluations(config: TrainConfig) -> TrainConfig:
    """The pipeline evaluates the model before and after each training stage on its held-out sets (cached by the
    weights): the trainer's own evaluations at those two points would repeat that work, so they are left out."""
    return dataclasses.replace(config, eval_ends=False)


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def disk_use(out: Path, stages: list[str]) -> dict:
    """Per stage: bytes on disk, and bytes saved whole (its weights materialised, the other files as they are); the
    totals of both, and the whole run directory's bytes."""
    rows = []
    for stage in stages:
        path = Path(out) / stage
        if not path.is_dir():
            continue
        stored, delta = dir_bytes(path), is_delta_dir(path)
        weights = sum(f.stat().st_size for f in weight_files(path))
        rows.append({"stage": stage, "delta": delta, "over": _over(path) if delta else None, "bytes": stored,
                     "whole_bytes": stored - weights + whole_weight_bytes(path) if delta else stored})
    return {"stages": rows, "stages_bytes": sum(r["bytes"] for r in rows),
            "whole_bytes": sum(r["whole_bytes"] for r in rows), "run_bytes": dir_bytes(Path(out))}


def _over(path: Path) -> str:
    """What a delta stage is saved over: "source" (the source model) or "parent" (another stage)."""
    return "source" if "source" in read_delta(path) else "parent"


def disk_summary(disk: dict) -> str:
    return (f"disk: the stages take {fmt_bytes(disk['stages_bytes'])} ({fmt_bytes(disk['whole_bytes'])} if each "
            f"were saved whole), the run directory {fmt_bytes(disk['run_bytes'])}")


def disk_markdown(disk: dict) -> list[str]:
    """The report's disk section."""
    lines = ["", "## Disk use", "", "| stage | saved as | on disk | saved whole |", "|---|---|---|---|"]
    for row in disk["stages"]:
        lines.append(f"| {row['stage']} | {'changes over its ' + row['over'] if row['delta'] else 'whole'} | "
                     f"{fmt_bytes(row['bytes'])} | {fmt_bytes(row['whole_bytes'])} |")
    lines.append(f"| **all stages** | | **{fmt_bytes(disk['stages_bytes'])}** | {fmt_bytes(disk['whole_bytes'])} |")
    lines += ["", f"The run directory (stages, reports, records) takes {fmt_bytes(disk['run_bytes'])} "
              f"({disk['run_bytes']:,} bytes)."]
    return lines
