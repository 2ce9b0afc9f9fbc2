"""Which stages of a pipeline run can be reused. Each stage directory OUT/<stage> records the recipe settings that
made it (stage.json, written when the stage is finished; an interrupted training stage carries them in its
checkpoint). A rerun reuses a finished stage, or resumes an interrupted one, only when its recorded settings equal
the recipe's; otherwise it stops at once, naming the stage and each setting that differs, before anything is loaded.
`--redo STAGE` redoes that stage and the stages built on it.

The settings of a stage are the recipe entries that determine it, cumulatively: converted = model, init, convert;
distill = those + data, block_size, distill; softmax-layers = those + keep_softmax; teacher-finetune = model, data,
block_size, teacher_finetune; finetune = softmax-layers' + finetune, teacher_finetune.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import T2RError
from ..io import write_json
from ..train.checkpoint import recorded_settings
from .recipes import PipelineRecipe

RECORD = "stage.json"
STAGES = ("converted", "distill", "softmax-layers", "teacher-finetune", "finetune")
_CONVERTED = ("model", "init", "convert")
_DISTILL = (*_CONVERTED, "data", "block_size", "distill")
_SOFTMAX = (*_DISTILL, "keep_softmax")
KEYS = {"converted": _CONVERTED, "distill": _DISTILL, "softmax-layers": _SOFTMAX,
        "teacher-finetune": ("model", "data", "block_size", "teacher_finetune"),
        "finetune": (*_SOFTMAX, "finetune", "teacher_finetune")}
BUILT_ON = {"converted": (), "distill": ("converted",), "softmax-layers": ("converted", "distill"),
            "teacher-finetune": (), "finetune": ("converted", "distill", "softmax-layers", "teacher-finetune")}


class StageMismatchError(T2RError):
    """A finished or interrupted stage made with other settings than the recipe's (or with none recorded)."""


def stage_settings(recipe: PipelineRecipe, stage: str) -> dict:
    """The recipe entries that determine `stage`, as JSON values (what stage.json records)."""
    return json.loads(recipe.model_dump_json(include=set(KEYS[stage])))


def active_stages(recipe: PipelineRecipe) -> list[str]:
    """The stages `recipe` runs, in order."""
    keeps = recipe.keep_softmax is not None and recipe.keep_softmax != "auto:0"
    runs = {"converted": True, "distill": recipe.distill is not None, "softmax-layers": keeps,
            "teacher-finetune": recipe.teacher_finetune is not None, "finetune": recipe.finetune is not None}
    return [stage for stage in STAGES if runs[stage]]


def recorded(stage_dir: Path) -> tuple[str, dict | None]:
    """(state, recorded settings): "finished" (stage.json), "interrupted" (a checkpoint), "unrecorded" (a model made
    before stages recorded their settings) or "empty" (nothing to reuse)."""
    if (stage_dir / RECORD).is_file():
        return "finished", json.loads((stage_dir / RECORD).read_text())["settings"]
    checkpoint = recorded_settings(stage_dir)
    if checkpoint is not None:
        return "interrupted", checkpoint.get("pipeline")
    if (stage_dir / "config.json").is_file():
        return "unrecorded", None
    return "empty", None


def write_record(stage_dir: Path, stage: str, settings: dict) -> None:
    write_json(stage_dir / RECORD, {"stage": stage, "settings": settings})


def _flat(value, prefix: str = "") -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(recorded: dict, expected: dict) -> list[str]:
    """`key: OLD there, NEW in the recipe` for every (dotted) setting that differs."""
    old, new, absent = _flat(recorded), _flat(expected), object()
    shown = lambda d, key: json.dumps(d[key]) if key in d else "(absent)"  # noqa: E731
    return [f"{key}: {shown(old, key)} there, {shown(new, key)} in the recipe"
            for key in dict.fromkeys([*old, *new]) if old.get(key, absent) != new.get(key, absent)]


def _check(stage: str, stage_dir: Path, recipe: PipelineRecipe) -> str:
    """"reuse", "resume" or "run" for a stage not being redone; raises if its settings differ from the recipe's."""
    state, settings = recorded(stage_dir)
    if state == "empty":
        return "run"
    redo = f"pass --redo {stage} to redo it (and the stages built on it), or choose another --out"
    if settings is None:
        raise StageMismatchError(f"stage {stage} in {stage_dir} has no recorded settings (it was made before t2r "
                                 f"recorded them in {RECORD}), so it cannot be checked against the recipe; {redo}")
    diff = differences(settings, stage_settings(recipe, stage))
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise StageMismatchError(f"stage {stage} in {stage_dir} was made with other settings than the recipe's: "
                                 f"{shown}; {redo}")
    return "reuse" if state == "finished" else "resume"


def plan_stages(recipe: PipelineRecipe, out: Path, redo: Iterable[str] = ()) -> dict[str, str]:
    """{stage: "reuse" | "resume" | "run" | "redo"} for every stage `recipe` runs into `out`; raises
    `StageMismatchError` if a stage there was made with other settings and is not redone."""
    redo, active = set(redo), active_stages(recipe)
    unknown = sorted(redo - set(STAGES))
    if unknown:
        raise T2RError(f"--redo takes stage names ({', '.join(STAGES)}), got {', '.join(unknown)}")
    absent = sorted(redo - set(active))
    if absent:
        raise T2RError(f"--redo {', '.join(absent)}: the recipe has no such stage (its stages: {', '.join(active)})")
    again = {s for s in active if s in redo or redo & set(BUILT_ON[s])}
    return {s: "redo" if s in again else _check(s, Path(out) / s, recipe) for s in active}
