"""Commands that prepare data and train: `t2r data`, `t2r distill`, `t2r finetune`, `t2r pipeline`, `t2r demo`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import T2RError
from ..io import check_writable
from ..parallel import is_parallel_dir, is_parallel_source, prepare_parallel
from ..stages.recipes import read_recipe
from ..train.settings import DistillSettings, FinetuneSettings
from .models import check_converted, load_any, load_converted
from .translation import distill_pairs, finetune_pairs

# what needs torch or transformers is imported inside the command that uses it: `t2r --help` does not wait for it

log = logging.getLogger("t2r")


def data_command(source: str, *, out: str, model: str | None = None, block_size: int = 512,
                 as_json: bool = False) -> dict:
    """Build a tokenized corpus (train / held-out blocks) from text files, a directory, jsonl or a built-in corpus.

    Args:
        source: text file, directory, .jsonl, hf:NAME[:CONFIG[:SPLIT]], or a built-in corpus: austen, kjv, pydocs, mix; or translation pairs: parallel:SRC,TGT (aligned files), parallel:FILE.tsv, parallel:FILE.jsonl ({"src","tgt"}), parallel:hf:NAME:CONFIG:SPLIT:SRC-TGT, gettext:LANG[:DIR] (see t2r.parallel).
        out: directory to write train.safetensors, heldout.safetensors and meta.json to (pairs: train.jsonl, heldout.jsonl and meta.json).
        model: model whose tokenizer to use (default: smollm2, the embedded SmolLM2-135M-Instruct; pairs are kept as
            text).
        block_size: tokens per block.
        as_json: print the summary as JSON.
    """
    check_writable(out)
    if is_parallel_source(source):
        meta = prepare_parallel(source, out)
        return {"source": source, "out": str(out), **{k: meta[k] for k in (
            "train_pairs", "heldout_pairs", "skipped_empty", "format_only", "duplicates",
            "removed_overlapping_heldout")}}
    from ..data import prepare_data, tokenizer_of

    tokenizer = tokenizer_of(model)
    blocks = prepare_data(source, tokenizer, block_size=block_size, out_dir=out)
    return {"source": source, "out": str(out), "train_tokens": blocks.meta["train_tokens"],
            "heldout_tokens": blocks.meta["heldout_tokens"], "block_size": block_size}


def distill_command(model: str, *, data: str = "austen", options: DistillSettings = DistillSettings(),
                    out: str = "runs/distilled", block_size: int | None = None, resume: bool = False,
                    overwrite: bool = False, progress: bool = True, as_json: bool = False) -> dict:
    """Stage 1, attention transfer: train the feature maps so each linear attention layer imitates softmax attention.

    Args:
        model: directory of a converted model (from `t2r convert`).
        data: training text: austen, kjv, pydocs, mix, a folder from `t2r data`, a text/.jsonl file or folder; for a converted translation model, sentence pairs (a folder from `t2r data parallel:...`, or a parallel:/gettext: source): its decoder self- and cross-attention learn to imitate softmax, --batch-size pairs per step (default 32), --lr default 1e-2, no checkpoints.
        options: the training settings, as a recipe's `distill:` takes them.
        out: run directory: metrics.jsonl, checkpoint/, then the final model.
        block_size: tokens per block; unset: the prepared folder's, else 512.
        resume: continue the interrupted run in --out from its last checkpoint.
        overwrite: delete an earlier run in --out and start again.
        progress: show a progress bar on stderr.
        as_json: print the result as JSON.
    """
    if is_parallel_source(data) or is_parallel_dir(data):  # a translation model on sentence pairs
        return distill_pairs(model, data, options, out, overwrite)
    from ..stages.distill import attention_transfer, load_training_data
    from ..train.checkpoint import check_run_dir

    config = options.train_config(progress)
    check_writable(out)
    check_run_dir(Path(out), resume=resume, overwrite=overwrite)  # before minutes of loading
    student, tokenizer = load_converted(model)
    blocks = load_training_data(data, tokenizer, block_size)
    started = time.perf_counter()
    summary = attention_transfer(student, blocks, out, config, tokenizer=tokenizer, attn_ce=options.attn_ce,
                                 settings={"model": str(Path(model).resolve()), "data": data},
                                 resume=resume, overwrite=overwrite)
    if options.remote_code:
        summary["remote_code"] = add_remote_code(out)
    return {"model": model, "data": data, "stage": "distill", **summary,
            "wall_seconds": round(time.perf_counter() - started, 2)}


def finetune_command(model: str, *, data: str = "austen", options: FinetuneSettings = FinetuneSettings(),
                     teacher: str | None = None, out: str = "runs/finetuned", block_size: int | None = None,
                     resume: bool = False, overwrite: bool = False, progress: bool = True,
                     as_json: bool = False) -> dict:
    """Stage 2, finetuning: the whole model, or LoRA adapters (merged on export), on the LM loss (+ KD to a teacher).

    Args:
        model: directory of a converted model (e.g. from `t2r distill`); a plain model also works (a baseline).
        data: training text: austen, kjv, pydocs, mix, a folder from `t2r data`, a text/.jsonl file or folder; for a translation model, sentence pairs (a folder from `t2r data parallel:...`, or a parallel:/gettext: source): teacher-forced cross-entropy on the target tokens (+ --kd: KL from the teacher, by default the converted model's original), --batch-size pairs per step (default 32), no checkpoints.
        options: the training settings, as a recipe's `finetune:` takes them.
        teacher: teacher model for --kd (HF directory, GGUF file); default: the student's own original model.
        out: run directory: metrics.jsonl, checkpoint/, then the final model.
        block_size: tokens per block; unset: the prepared folder's, else 512.
        resume: continue the interrupted run in --out from its last checkpoint.
        overwrite: delete an earlier run in --out and start again.
        progress: show a progress bar on stderr.
        as_json: print the result as JSON.
    """
    if is_parallel_source(data) or is_parallel_dir(data):  # a translation model on sentence pairs
        return finetune_pairs(model, data, options, out, overwrite, teacher)
    from ..stages.distill import load_training_data
    from ..stages.finetune import Finetuning, check_same_tokenizer, check_same_vocabulary, finetune_model
    from ..train.checkpoint import check_run_dir

    if teacher is not None and not options.kd:
        raise T2RError("--teacher is used only for distillation: add --kd WEIGHT (e.g. --kd 1)")
    config = options.train_config(progress)
    check_writable(out)
    check_run_dir(Path(out), resume=resume, overwrite=overwrite)  # before minutes of loading
    student, tokenizer = load_any(model)
    if options.remote_code:
        check_converted(student, model)
    teacher_model = None
    if teacher is not None:
        teacher_model, teacher_tokenizer = load_any(teacher)
        check_same_tokenizer(tokenizer, teacher_tokenizer, teacher)
        check_same_vocabulary(student, teacher_model, teacher)
    blocks = load_training_data(data, tokenizer, block_size)
    started = time.perf_counter()
    settings = {"model": str(Path(model).resolve()) if Path(model).exists() else model, "data": data,
                "teacher": teacher}
    summary = finetune_model(student, blocks, out, config, tokenizer=tokenizer,
                             method=Finetuning.of(options, teacher_model), settings=settings, resume=resume,
                             overwrite=overwrite)
    if options.remote_code:
        summary["remote_code"] = add_remote_code(out)
    return {"model": model, "data": data, "stage": "finetune", "lora": options.lora, "kd": options.kd, **summary,
            "wall_seconds": round(time.perf_counter() - started, 2)}


def add_remote_code(model_dir) -> str:
    """Write the code of the model saved in `model_dir` beside it (`t2r.remote_code`); returns its entry file."""
    from ..remote_code import ENTRY, write_remote_code

    write_remote_code(model_dir)
    log.info("wrote the model's code to %s: transformers loads it with trust_remote_code=True", model_dir)
    return str(Path(model_dir) / f"{ENTRY}.py")


def _stages(redo: str) -> list[str]:
    return [s.strip() for s in redo.split(",") if s.strip()]


def pipeline_command(*, config: str, out: str | None = None, redo: str = "", remote_code: bool = False,
                     as_json: bool = False, **overrides: str) -> dict:
    """Run a recipe end to end: convert, attention transfer, softmax layers, finetune, evaluate, export, report.

    Args:
        config: YAML recipe file, or the name of a shipped one: t2r-paper, random-init-baseline, t2r-transfer,
            hedgehog-transfer, hybrid-window-auto, gla-transfer, delta-transfer, gated-delta-window,
            gemma3-global, demo.
        out: run directory (default: runs/<recipe name>); a rerun reuses each finished stage, and resumes an
            interrupted one, whose recorded settings equal the recipe's, and stops if they differ.
        redo: redo these stages and the stages built on them (comma-separated: converted, distill, softmax-layers,
            teacher-finetune, finetune).
        remote_code: also save the final model's code with an auto_map, so that plain transformers loads it without
            t2r, with trust_remote_code=True (the Hub, lm-eval's own CLI). Off by default: running a model's code is
            a trust decision for whoever loads it.
        as_json: print the results as JSON.
        overrides: any recipe value, as a dotted key and a YAML value: --distill.tokens 4k --eval.max_blocks 2.
    """
    from ..stages.pipeline import run_pipeline

    recipe = read_recipe(config, overrides)
    results = run_pipeline(recipe, out or f"runs/{recipe.name}", redo=_stages(redo))
    if remote_code:
        results["remote_code"] = add_remote_code(results["final_model"])
    return results


def demo_command(*, out: str = "runs/demo", redo: str = "", as_json: bool = False, **overrides: str) -> dict:
    """A short pipeline on the embedded default model: convert (Hedgehog map + 64-token softmax window), a brief
    attention transfer on Jane Austen, then the teacher-vs-RNN perplexity table, text from both, decode speed and
    cache sizes. Rerunning reuses the finished stages in --out.

    Args:
        out: run directory.
        redo: redo these stages (comma-separated) and the stages built on them.
        as_json: print the results as JSON.
        overrides: any value of the demo recipe, as a dotted key and a YAML value: --distill.tokens 4k.
    """
    from ..stages.pipeline import run_pipeline

    return run_pipeline(read_recipe("demo", overrides), out, redo=_stages(redo))
