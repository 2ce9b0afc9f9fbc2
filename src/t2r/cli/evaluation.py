"""Commands that measure: `t2r eval`, `t2r lm-eval`, `t2r bench`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..bench import BenchSettings, plot_bench, run_bench
from ..data import load_documents, prepare_data, read_meta
from ..errors import T2RError
from ..evaluate import DEFAULT_BLOCK_SIZE, SPLITS, perplexity, predicted_bytes, text_perplexity
from ..lm_eval_bridge import (
    AUSTEN_BLOCKS,
    TASKS_DIR,
    TEXT_TASK,
    austen_heldout_file,
    make_lm,
    require_lm_eval,
    task_metrics,
)
from ..persistence import load
from ..sources import load_model
from .models import load_with_teacher

log = logging.getLogger("t2r")


def _block_size(data: str, context: int) -> int:
    """A folder written by `t2r data --out` keeps its block size; otherwise blocks of max(512, context)."""

    path = Path(data).expanduser()
    meta = read_meta(path) if path.is_dir() else None
    return int(meta["block_size"]) if meta else max(DEFAULT_BLOCK_SIZE, context)


def _check_args(split: str, context: int, max_blocks: int | None, batch_size: int) -> None:
    if split not in SPLITS:
        raise T2RError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if context < 2:
        raise T2RError(f"--context must be at least 2 tokens, got {context}")
    if max_blocks is not None and max_blocks <= 0:
        raise T2RError(f"--max-blocks must be positive, got {max_blocks}")
    if batch_size <= 0:
        raise T2RError(f"--batch-size must be positive, got {batch_size}")


def eval_command(model: str, *, data: str = "austen", split: str = "heldout", context: int = 512,
                 max_blocks: int | None = None, batch_size: int = 4, text: str | None = None, teacher: bool = True,
                 teacher_model: str | None = None, as_json: bool = False) -> dict:
    """Perplexity of a converted model beside its original (the teacher) on the same tokens.

    Args:
        model: directory of a converted model; a plain model (HF directory, GGUF file) gives the teacher row only.
        data: austen, kjv, pydocs, mix, a text/.jsonl file, a folder of text files, or a `t2r data --out` folder.
        split: train or heldout (the split rule of `t2r data`).
        context: tokens per evaluation window: blocks of 512 tokens (of `context`, if longer; a `t2r data` folder
            keeps its own) are cut into non-overlapping windows of this length. With --text: lm-eval's max_length.
        max_blocks: evaluate only the first N blocks of the split.
        batch_size: windows per forward pass.
        text: a text file, .jsonl (one document per line, field "text") or folder: compute lm-eval's
            loglikelihood_rolling figures (word perplexity, byte perplexity, bits per byte) over it instead.
        teacher: also evaluate the teacher: the original softmax model rebuilt from the converted model's weights.
        teacher_model: evaluate this model (GGUF file, HF directory, hub id) as the teacher instead; use the source
            model after full finetuning, which changes the weights the rebuilt original would use.
        as_json: print the result as JSON.
    """
    _check_args(split, context, max_blocks, batch_size)
    start = time.perf_counter()
    student, load_teacher, tokenizer = load_with_teacher(model)
    if text is not None:

        documents = load_documents(text)
        run = lambda m, label: text_perplexity(m, tokenizer, documents, max_length=context,  # noqa: E731
                                               batch_size=batch_size, progress=label)
        source = {"text": text, "documents": len(documents)}
    else:

        prepared = prepare_data(data, tokenizer, block_size=_block_size(data, context))
        blocks = getattr(prepared, split)
        if max_blocks is not None:
            blocks = blocks[:max_blocks]
        n_bytes = predicted_bytes(tokenizer, blocks, context)
        run = lambda m, label: perplexity(m, blocks, context=context, batch_size=batch_size,  # noqa: E731
                                          byte_count=n_bytes, progress=label)
        source = {"data": data, "split": split, "blocks": int(blocks.shape[0]),
                  "block_size": int(blocks.shape[1])}
    result = {"model": model, **source, "context": context}
    if student is not None:
        log.info("evaluating the converted model")
        result["student"] = run(student, "student")
    if teacher_model is not None:

        log.info("evaluating the teacher %s", teacher_model)
        result["teacher"] = run(load_model(teacher_model)[0], "teacher")
        result["teacher_model"] = teacher_model
    elif teacher or student is None:
        log.info("evaluating the original model")
        result["teacher"] = run(load_teacher(), "teacher")
    if "student" in result and "teacher" in result:
        result["ratio"] = result["student"]["ppl"] / result["teacher"]["ppl"]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def lm_eval_command(model: str, *, tasks: str = TEXT_TASK, text: str | None = None, original: bool = False,
                    context: int = 512, limit: int | None = None, batch_size: int = 1,
                    austen_blocks: int = AUSTEN_BLOCKS, device: str = "cpu", as_json: bool = False) -> dict:
    """Run lm-evaluation-harness on a model, with t2r imported and its local tasks available.

    Args:
        model: directory of a converted (or any HF) model, loaded by lm-eval as `--model hf`; or a GGUF file.
        tasks: comma-separated lm-eval task names; t2r_text is t2r's local rolling-perplexity task.
        text: text file, .jsonl (field "text") or folder for t2r_text; default: a held-out Austen chunk.
        original: evaluate the original softmax model rebuilt from the converted model's weights.
        context: lm-eval's max_length: the rolling window, in tokens.
        limit: evaluate only the first N documents of each task.
        batch_size: windows per forward pass.
        austen_blocks: held-out Austen blocks of 512 tokens in the default text.
        device: cpu, cuda, cuda:0, ...
        as_json: print the result as JSON.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if context < 2:
        raise T2RError(f"--context must be at least 2 tokens, got {context}")
    if batch_size <= 0 or (limit is not None and limit <= 0):
        raise T2RError("--batch-size and --limit must be positive")
    if not (Path(model).exists() or model.count("/") <= 1):
        raise T2RError(f"no such model directory or file: {model!r}")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    start = time.perf_counter()
    lm, model_args, tokenizer, which = make_lm(model, original, context, batch_size, device)
    if TEXT_TASK in task_list and text is None:
        text = str(austen_heldout_file(tokenizer, blocks=austen_blocks))
    if text is not None and not Path(text).exists():
        raise T2RError(f"--text {text!r} does not exist")
    ours = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(task_list) <= ours,
                          metadata={"tokenizer": tokenizer, **({"text": text} if text else {})})  # indexing lm-eval's
    # own tasks takes seconds; the recall tasks build their prompts with the model's tokenizer
    log.info("lm-eval %s on %s (%s model)", ",".join(task_list), model, which)
    results = simple_evaluate(model=lm, model_args=model_args, tasks=task_list, batch_size=batch_size,
                              device=device, limit=limit, task_manager=manager, log_samples=False,
                              bootstrap_iters=0)
    if results is None:  # a non-zero rank in a distributed run
        return {}
    return {"model": model, "which": which, "tasks": task_list, "text": text, "context": context,
            "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "results": task_metrics(results["results"]), "seconds": round(time.perf_counter() - start, 2)}


def bench_command(model: str, *, options: BenchSettings = BenchSettings(), plot: str | None = None,
                  out_json: str | None = None, threads: int | None = None, device: str = "cpu",
                  as_json: bool = False) -> dict:
    """Measure decode speed, prefill speed and memory of a converted model against its original.

    Args:
        model: directory of a converted model (from `t2r convert`); its original is rebuilt from the same weights.
        options: what to measure.
        plot: write a PNG plot (decode ms/token and cache bytes vs context) to this file; needs matplotlib.
        out_json: write the full result as JSON to this file.
        threads: torch CPU threads (default: torch's own choice).
        device: torch device to run on, e.g. cpu or cuda.
        as_json: print the result as JSON.
    """
    if threads is not None and threads < 1:
        raise T2RError(f"--threads must be >= 1, got {threads}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise T2RError(f"--device {device}: no CUDA device is visible to torch here")
    converted = load(model)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        result = run_bench(converted, options, device=device)
    finally:
        torch.set_num_threads(previous)
    result["model"] = str(model)
    if plot:
        result["plot"] = str(plot_bench(result, plot))
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
        result["json_file"] = str(out_json)
    return result
