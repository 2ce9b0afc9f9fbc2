"""`t2r recall`: synthetic recall (passkey retrieval, multi-query associative recall) of a converted model beside its
original, and the table it prints."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydantic import Field

from ..errors import T2RError
from ..settings import Settings
from .evaluation import check_device
from .models import DeviceSettings, load_with_teacher

log = logging.getLogger("t2r")

LABELS = {"teacher": "original", "student": "converted"}
CELL_KEYS = {"passkey": ("length", "depth"), "mqar": ("pairs",)}


class GridSettings(Settings):
    """The cells of a recall run: passkey lengths x depths, or mqar numbers of pairs."""

    lengths: str = Field("1k,2k,4k", description="passkey context lengths in tokens, comma-separated (k = 1024).")
    depths: str = Field("0,0.25,0.5,0.75,1", description="passkey depths of the number in [0, 1] (0 = start of the "
                                                          "filler, 1 = its end), comma-separated.")
    pairs: str = Field("8,32,128", description="mqar numbers of key-value pairs per prompt, comma-separated (16 "
                                               "queries per prompt).")


def recall_command(model: str, *, task: str = "passkey", grid: GridSettings | None = None, samples: int = 20,
                   teacher: bool = True, plot: str | None = None, seed: int = 0, run: DeviceSettings | None = None,
                   as_json: bool = False) -> dict:
    """Synthetic recall of a converted model beside its original: passkey retrieval or multi-query associative recall.

    The samples are generated from the seed with the model's tokenizer (no download). Each query is scored by
    log-likelihood (the right answer against 9 distractors of the same form: chance 0.1) and by greedy generation.
    Runs on the GPU when there is one (--device auto, the default).

    Args:
        model: directory of a converted model; a plain model (HF directory, GGUF file, hub id) gives its row only.
        task: passkey (a 5-digit number hidden in filler text) or mqar (key-value pairs, then queries).
        grid: the cells: passkey lengths and depths, or mqar numbers of pairs.
        samples: prompts per cell (passkey: per length and depth; mqar: per number of pairs).
        teacher: also run the original softmax model rebuilt from the converted model's weights.
        plot: write a PNG (passkey: length x depth heat maps side by side; mqar: accuracy vs pairs); needs matplotlib.
        seed: seed of the generated samples.
        run: the device (cpu, cuda, cuda:N, auto) and the weights' dtype (float32, bfloat16 or float16; both models;
            the recurrent state stays float32).
        as_json: print the result as JSON.
    """
    import torch

    from ..recall import RecallSettings, parse_depths, parse_lengths, parse_pairs, plot_recall, run_recall

    grid, run = grid or GridSettings(), run or DeviceSettings()
    settings = RecallSettings(task=task, lengths=parse_lengths(grid.lengths), depths=parse_depths(grid.depths),
                              pairs=parse_pairs(grid.pairs), samples=samples, seed=seed)
    if not (Path(model).exists() or model.count("/") <= 1):
        raise T2RError(f"no such model directory or file: {model!r}")
    start = time.perf_counter()
    check_device(run.torch_device())
    device, dtype = torch.device(run.torch_device()), run.dtype
    student, load_teacher, tokenizer = load_with_teacher(model, dtype=dtype)
    result = {"model": model, "task": task, "which": "converted" if student is not None else "plain",
              "device": str(device), "dtype": dtype, "chance": 1.0 / (settings.distractors + 1), "settings": settings.to_dict()}
    if student is not None:
        log.info("recall (%s) of the converted model", task)
        result["student"] = run_recall(student.to(device), tokenizer, settings)
    if teacher or student is None:
        log.info("recall (%s) of the %s model", task, "original" if student is not None else "plain")
        result["teacher"] = run_recall(load_teacher().to(device), tokenizer, settings)
    if plot:
        result["plot"] = str(plot_recall(result, plot))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def render_recall(r: dict) -> str:
    """The table `t2r recall` prints: per cell, accuracy by log-likelihood and by greedy generation per model."""
    keys = CELL_KEYS[r["task"]]
    names = [n for n in ("teacher", "student") if n in r]
    label = {**LABELS, "teacher": LABELS["teacher"] if r.get("which") != "plain" else "model"}
    s = r["settings"]
    lines = [f"{r['task']} recall of {r['model']}: {s['samples']} samples per cell"
             + (f", up to {s['queries']} queries each" if r["task"] == "mqar" else "")
             + f"; chance {r['chance']:.2f} by log-likelihood ({s['distractors']} distractors), seed {s['seed']}",
             " ".join(f"{'':>7}" for _ in keys) + f" {'':>7}" + "".join(f" {label[n]:>15}" for n in names),
             " ".join(f"{k:>7}" for k in keys) + f" {'tokens':>7}" + "  loglik  greedy" * len(names)]
    rows = {tuple(c[k] for k in keys): c for c in r[names[0]]["cells"]}
    for cell_key, cell in rows.items():
        cells = [{tuple(c[k] for k in keys): c for c in r[n]["cells"]}[cell_key] for n in names]
        values = " ".join(f"{v:7.2f}" if isinstance(v, float) else f"{v:7d}" for v in cell_key)
        lines.append(f"{values} {cell['tokens']:7.0f}"
                     + "".join(f"  {c['acc_ll']:6.2f}  {c['acc_gen']:6.2f}" for c in cells))
    if "plot" in r:
        lines.append(f"plot: {r['plot']}")
    lines.append(f"[{r['seconds']} s on {r['device']}]")
    return "\n".join(lines)
