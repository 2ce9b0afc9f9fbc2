"""Commands that measure: `t2r eval`, `t2r lm-eval`, `t2r bench`."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from pydantic import Field, field_validator

from ..ablation import PARTS
from ..bench import BenchSettings, parse_sizes
from ..errors import T2RError
from ..io import check_writable
from ..settings import Settings
from ..tasks import AUSTEN_BLOCKS, TEXT_TASK
from .models import DeviceSettings, check_language_model, load_with_teacher, torch_dtype

# what needs torch or transformers is imported inside the function that uses it: `t2r --help` does not wait for it

log = logging.getLogger("t2r")


def _block_size(data: str, context: int) -> int:
    """A folder written by `t2r data --out` keeps its block size; otherwise blocks of max(512, context)."""
    from ..data import read_meta
    from ..evaluate import DEFAULT_BLOCK_SIZE

    path = Path(data).expanduser()
    meta = read_meta(path) if path.is_dir() else None
    return int(meta["block_size"]) if meta else max(DEFAULT_BLOCK_SIZE, context)


class EvalOptions(Settings):
    """How `t2r eval` evaluates (the flags besides what and on what)."""

    max_blocks: int | None = Field(None, gt=0, description="evaluate only the first N blocks (with --positions: "
                                                           "documents) of the split.")
    batch_size: int = Field(4, gt=0, description="windows per forward pass.")
    teacher: bool = Field(True, description="also evaluate the teacher: the original softmax model rebuilt from the "
                                            "converted model's weights.")
    positions: bool = Field(False, description="loss by position: whole held-out documents of --context tokens, "
                                               "each read in chunks that carry the model's state, averaged in "
                                               "position buckets (0-64, 64-256, 256-1k, 1k-4k, 4k-8k, 8k-16k).")
    chunk: int = Field(512, gt=0, description="with --positions: tokens per forward pass (the working memory grows with "
                                               "it, the state does not).")
    ablate: str = Field("", description="also evaluate the converted model with a part switched off, comma-"
                                        f"separated: {', '.join(PARTS)} (window only, recurrence only, decays set "
                                        "to 1, kept softmax layers made linear).")
    plot: str | None = Field(None, description="with --positions: write the loss-by-position plot (PNG) here.")
    bleu: bool = Field(False, description="translation models: BLEU and chrF (sacrebleu) of beam search on --data, a "
                                          "parallel folder from `t2r data parallel:... --out` (or a parallel: / "
                                          "gettext: source); --max-blocks caps the sentences.")
    beam: int = Field(4, gt=0, description="with --bleu: the beam size.")

    @field_validator("ablate")
    @classmethod
    def _parts(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown ablation {unknown[0]!r}; choose from: {', '.join(PARTS)}")
        return ",".join(parts)


def parse_context(context: str | int) -> int:
    """"512", "16k" (k = 1024) or an int -> tokens (at least 2)."""
    value = context if isinstance(context, int) else parse_sizes(str(context), "--context")
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    if not isinstance(value, int) or value < 2:
        raise T2RError(f"--context takes one length of at least 2 tokens, like 512 or 16k; got {context!r}")
    return value


def _text_runner(text: str, tokenizer, context: int, options: EvalOptions):
    from ..data import load_documents
    from ..evaluate import text_perplexity

    documents = load_documents(text)
    run = lambda m, label: text_perplexity(m, tokenizer, documents, max_length=context,  # noqa: E731
                                           batch_size=options.batch_size, progress=label)
    return run, {"text": text, "documents": len(documents)}


def _blocks_runner(data: str, split: str, tokenizer, context: int, options: EvalOptions):
    from ..data import prepare_data
    from ..evaluate import perplexity, predicted_bytes

    blocks = getattr(prepare_data(data, tokenizer, block_size=_block_size(data, context)), split)[:options.max_blocks]
    n_bytes = predicted_bytes(tokenizer, blocks, context)
    run = lambda m, label: perplexity(m, blocks, context=context, batch_size=options.batch_size,  # noqa: E731
                                      byte_count=n_bytes, progress=label)
    return run, {"data": data, "split": split, "blocks": int(blocks.shape[0]), "block_size": int(blocks.shape[1])}


def _positions_runner(data: str, split: str, tokenizer, context: int, options: EvalOptions):
    from ..data import prepare_data
    from ..longeval import PositionSettings, position_losses

    docs = getattr(prepare_data(data, tokenizer, block_size=context), split)[:options.max_blocks]  # (N, context)
    settings = PositionSettings(chunk=options.chunk, max_cache_bytes=_kv_budget())
    run = lambda m, label: position_losses(m, docs, replace(settings, progress=label))  # noqa: E731
    return run, {"data": data, "split": split, "documents": int(docs.shape[0]), "positions": True,
                 "kv_cache_cap_bytes": settings.max_cache_bytes}


def _kv_budget() -> int | None:
    """Half the memory available now: where a softmax model's growing KV cache stops reading a long document."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available // 2


def _ablations(student, run, parts: str) -> dict:
    """The student's result with each part switched off (see `t2r.ablation`)."""
    from ..ablation import ablated

    out = {}
    for part in [p for p in parts.split(",") if p]:
        with ablated(student, part):
            log.info("evaluating the converted model with the %s part off", part)
            out[part] = run(student, f"{part} off")
    return out


def eval_command(model: str, *, data: str = "austen", split: str = "heldout", context: str = "512",
                 text: str | None = None, teacher_model: str | None = None, options: EvalOptions = EvalOptions(),
                 dtype: str = "float32", as_json: bool = False) -> dict:
    """Perplexity of a converted model beside its original (the teacher) on the same tokens; with --positions, loss
    by position over long held-out documents; with --ablate, also with a part of the converted model switched off.

    Args:
        model: directory of a converted model; a plain model (HF directory, GGUF file) gives the teacher row only.
        data: austen, kjv, pydocs, mix, a text/.jsonl file, a folder of text files, or a `t2r data --out` folder.
        split: train or heldout (the split rule of `t2r data`; held-out text is whole stretches of 16,384 tokens).
        context: tokens per evaluation window (k = 1024): blocks of 512 tokens (of `context`, if longer; a `t2r data`
            folder keeps its own) are cut into non-overlapping windows of this length. With --positions: the length
            of each document (up to 16k). With --text: lm-eval's max_length.
        text: a text file, .jsonl (one document per line, field "text") or folder: compute lm-eval's
            loglikelihood_rolling figures (word perplexity, byte perplexity, bits per byte) over it instead.
        teacher_model: evaluate this model (GGUF file, HF directory, hub id) as the teacher instead; use the source
            model after full finetuning, which changes the weights the rebuilt original would use.
        options: how to evaluate.
        dtype: weights in float32, bfloat16 or float16 (both models; the recurrent state stays float32).
        as_json: print the result as JSON.
    """
    if options.bleu:
        from .translation import bleu_eval

        return bleu_eval(model, data, split, options.beam, options.max_blocks, options.teacher, dtype)
    from ..evaluate import SPLITS
    from ..sources import load_model

    if split not in SPLITS:
        raise T2RError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    context = parse_context(context)
    weights_dtype = torch_dtype(dtype)
    if options.ablate and text is not None:
        raise T2RError("--ablate works on --data blocks or --positions documents, not with --text")
    start = time.perf_counter()
    student, load_teacher, tokenizer = load_with_teacher(model, dtype=dtype)
    from ..generate import check_positions

    check_positions(student if student is not None else load_teacher(), context, f"--context {context}",
                    "choose a shorter --context")
    if options.ablate and student is None:
        raise T2RError(f"--ablate switches off parts of a converted model; {model!r} is not one")
    if text is not None:
        run, source = _text_runner(text, tokenizer, context, options)
    elif options.positions:
        run, source = _positions_runner(data, split, tokenizer, context, options)
    else:
        run, source = _blocks_runner(data, split, tokenizer, context, options)
    result = {"model": model, **source, "context": context}
    if teacher_model is not None:
        log.info("evaluating the teacher %s", teacher_model)
        result.update(teacher=run(load_model(teacher_model, dtype=weights_dtype)[0], "teacher"), teacher_model=teacher_model)
    elif options.teacher or student is None:
        log.info("evaluating the original model")
        result["teacher"] = run(load_teacher(), "teacher")
    if student is not None:
        log.info("evaluating the converted model")
        result["student"] = run(student, "student")
        result["ablations"] = _ablations(student, run, options.ablate)
    return _finish(result, options, start)


def _finish(result: dict, options: EvalOptions, start: float) -> dict:
    """Ratios to the teacher, the plot, the time."""
    from ..longeval import plot_positions

    positions = bool(result.get("positions"))
    if "student" in result and "teacher" in result and not positions:
        result["ratio"] = result["student"]["ppl"] / result["teacher"]["ppl"]
    for r in result.get("ablations", {}).values():  # the perplexity change the ablation makes (per bucket)
        if positions:
            r["bucket_ratios"] = [a["ppl"] / b["ppl"] for a, b in zip(r["buckets"], result["student"]["buckets"])]
        else:
            r["ratio_to_student"] = r["ppl"] / result["student"]["ppl"]
    if options.plot and result.get("positions"):
        curves = {n: result[n] for n in ("teacher", "student") if n in result}
        curves.update({f"student, {part} off": r for part, r in result.get("ablations", {}).items()})
        result["plot"] = str(plot_positions(curves, options.plot, title=f"loss by position: {result['data']}"))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def lm_eval_command(model: str, *, tasks: str = TEXT_TASK, text: str | None = None, original: bool = False,
                    context: int = 512, limit: int | None = None, batch_size: int = 1,
                    austen_blocks: int = AUSTEN_BLOCKS, run: DeviceSettings | None = None,
                    as_json: bool = False) -> dict:
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
        run: the device (cpu, cuda, cuda:N, auto) and the weights' dtype (float32, bfloat16 or float16; the
            recurrent state stays float32).
        as_json: print the result as JSON.
    """
    run = run or DeviceSettings()
    device, dtype = run.torch_device(), run.dtype
    from ..lm_eval_bridge import austen_heldout_file, make_lm, require_lm_eval, task_metrics
    from ..tasks import TASKS_DIR

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
    check_device(device)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    start = time.perf_counter()
    lm, model_args, tokenizer, which = make_lm(model, original, context, batch_size, device, dtype)
    if TEXT_TASK in task_list and text is None:
        text = str(austen_heldout_file(tokenizer, blocks=austen_blocks))
    if text is not None and not Path(text).exists():
        raise T2RError(f"--text {text!r} does not exist")
    ours = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(task_list) <= ours,
                          metadata={"tokenizer": tokenizer, **({"text": text} if text else {})})  # indexing lm-eval's
    # own tasks takes seconds; the recall tasks build their prompts with the model's tokenizer
    unknown = [t for t in task_list if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise T2RError(f"unknown lm-eval task {unknown[0]!r}: see `lm-eval ls tasks`; t2r's own: {', '.join(sorted(ours))}")
    log.info("lm-eval %s on %s (%s model)", ",".join(task_list), model, which)
    results = simple_evaluate(model=lm, model_args=model_args, tasks=task_list, batch_size=batch_size,
                              device=device, limit=limit, task_manager=manager, log_samples=False,
                              bootstrap_iters=0)
    if results is None:  # a non-zero rank in a distributed run
        return {}
    return {"model": model, "which": which, "dtype": dtype, "tasks": task_list, "text": text, "context": context,
            "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "results": task_metrics(results["results"]), "seconds": round(time.perf_counter() - start, 2)}


def check_device(device: str) -> None:
    """A device torch knows and can see here (`--device`)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise T2RError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise T2RError(f"--device {device}: no CUDA device is visible to torch here")
    if kind not in ("cpu", "cuda"):
        raise T2RError(f"--device {device!r}: t2r runs on cpu or cuda")


def bench_command(model: str, *, options: BenchSettings = BenchSettings(), plot: str | None = None,
                  out_json: str | None = None, threads: int | None = None, device: str = "cpu",
                  dtype: str = "float32", as_json: bool = False) -> dict:
    """Measure decode speed, prefill speed and memory of a converted model against its original.

    Args:
        model: directory of a converted model (from `t2r convert`); its original is rebuilt from the same weights.
        options: what to measure.
        plot: write a PNG plot (decode ms/token and cache bytes vs context) to this file; needs matplotlib.
        out_json: write the full result as JSON to this file.
        threads: torch CPU threads (default: torch's own choice).
        device: torch device to run on, e.g. cpu or cuda.
        dtype: weights in float32, bfloat16 or float16 (both models; the recurrent state stays float32).
        as_json: print the result as JSON.
    """
    import torch

    from ..bench import plot_bench, run_bench
    from ..io import write_json
    from ..persistence import load, load_tokenizer

    if threads is not None and threads < 1:
        raise T2RError(f"--threads must be >= 1, got {threads}")
    check_device(device)
    for path, name in ((plot, "--plot"), (out_json, "--out-json")):
        if path:
            check_writable(path, name, directory=False)  # before minutes of measuring
    converted = load(model, dtype=torch_dtype(dtype))
    check_language_model(converted, model)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        tokenizer = load_tokenizer(model) if "int8" in options.quantize else None  # int8's calibration text
        result = run_bench(converted, options, device=device, tokenizer=tokenizer)
    finally:
        torch.set_num_threads(previous)
    result["model"] = str(model)
    if plot:
        result["plot"] = str(plot_bench(result, plot))
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        write_json(out_json, result)
        result["json_file"] = str(out_json)
    return result
