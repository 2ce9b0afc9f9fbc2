"""Commands that prepare data and train: `t2r data`, `t2r distill`, `t2r finetune`, `t2r pipeline`, `t2r demo`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..data import prepare_data, tokenizer_of
from ..errors import T2RError
from ..persistence import load, load_tokenizer
from ..stages.distill import attention_transfer, budget, load_training_data
from ..stages.finetune import DEFAULT_LR, check_same_tokenizer, finetune_model, load_student
from ..stages.pipeline import PipelineRecipe, run_pipeline
from ..train import TrainConfig, check_run_dir

log = logging.getLogger("t2r")


def data(source: str, *, out: str, model: str | None = None, block_size: int = 512, json: bool = False) -> dict:
    """Build a tokenized corpus (train / held-out blocks) from text files, a directory, jsonl or a built-in corpus.

    Args:
        source: text file, directory, .jsonl, hf:NAME[:CONFIG[:SPLIT]], or a built-in corpus: austen, kjv, pydocs, mix.
        out: directory to write train.safetensors, heldout.safetensors and meta.json to.
        model: model whose tokenizer to use (default: the embedded SmolLM2-135M-Instruct).
        block_size: tokens per block.
        json: print the summary as JSON.
    """
    tokenizer = tokenizer_of(model)
    blocks = prepare_data(source, tokenizer, block_size=block_size, out_dir=out)
    return {"source": source, "out": str(out), "train_tokens": blocks.meta["train_tokens"],
            "heldout_tokens": blocks.meta["heldout_tokens"], "block_size": block_size}


def distill(model: str, *, data: str = "austen", tokens: str = "300k", steps: int = 0, out: str = "runs/distilled",
            lr: float = 3e-2, batch_size: int = 1, grad_accum: int = 1, warmup: float = 0.05,
            attn_ce: float = 0.0, block_size: int | None = None, eval_every: int = 250, eval_blocks: int = 8,
            checkpoint_every: int = 100, seed: int = 0, resume: bool = False, overwrite: bool = False,
            progress: bool = True, json: bool = False) -> dict:
    """Stage 1, attention transfer: train the feature maps so each linear attention layer imitates softmax attention.

    Args:
        model: directory of a converted model (from `t2r convert`).
        data: training text: austen, kjv, pydocs, mix, a folder from `t2r data`, a text/.jsonl file or folder.
        tokens: token budget, e.g. 300k or 1M (rounded up to whole steps).
        steps: optimizer steps instead of --tokens (0: use --tokens).
        out: run directory: metrics.jsonl, checkpoint/, then the final model.
        lr: peak learning rate of AdamW (linear warmup, then cosine decay to a tenth of it).
        batch_size: blocks per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        warmup: warmup steps (a fraction of all steps if < 1).
        attn_ce: weight of Hedgehog's cross-entropy between attention rows (quadratic memory in the block size).
        block_size: tokens per block; unset: the prepared folder's, else 512.
        eval_every: evaluate on held-out blocks every this many steps (0: only before and after).
        eval_blocks: held-out blocks per evaluation (each costs two forward passes: transfer error and perplexity).
        checkpoint_every: write a checkpoint every this many steps (0: only on Ctrl-C).
        seed: seed of the data order and of the RNG.
        resume: continue the interrupted run in --out from its last checkpoint.
        overwrite: delete an earlier run in --out and start again.
        progress: show a progress bar on stderr.
        json: print the result as JSON.
    """

    config = TrainConfig(lr=lr, **budget(tokens, steps), batch_size=batch_size, grad_accum=grad_accum,
                         warmup=warmup, eval_every=eval_every, eval_blocks=eval_blocks,
                         checkpoint_every=checkpoint_every, seed=seed, progress=progress)
    check_run_dir(Path(out), resume=resume, overwrite=overwrite)  # before minutes of loading
    student = load(model)
    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise T2RError(f"{model!r} has no tokenizer files: convert it again with `t2r convert` (it saves one)")
    blocks = load_training_data(data, tokenizer, block_size)
    started = time.perf_counter()
    summary = attention_transfer(student, blocks, out, config, tokenizer=tokenizer, attn_ce=attn_ce,
                                 settings={"model": str(Path(model).resolve()), "data": data},
                                 resume=resume, overwrite=overwrite)
    return {"model": model, "data": data, "stage": "distill", **summary,
            "wall_seconds": round(time.perf_counter() - started, 2)}


def finetune(model: str, *, data: str = "austen", tokens: str = "300k", steps: int = 0, lora: int = 0,
             lora_modules: str = "", kd: float = 0.0, teacher: str | None = None, out: str = "runs/finetuned",
             lr: float | None = None, batch_size: int = 1, grad_accum: int = 1, warmup: float = 0.05,
             weight_decay: float = 0.0, max_grad_norm: float = 1.0, block_size: int | None = None,
             eval_every: int = 100, eval_blocks: int = 16, checkpoint_every: int = 100, seed: int = 0,
             resume: bool = False, overwrite: bool = False, progress: bool = True, json: bool = False) -> dict:
    """Stage 2, finetuning: the whole model, or LoRA adapters (merged on export), on the LM loss (+ KD to a teacher).

    Args:
        model: directory of a converted model (e.g. from `t2r distill`); a plain model also works (a baseline).
        data: training text: austen, kjv, pydocs, mix, a folder from `t2r data`, a text/.jsonl file or folder.
        tokens: token budget, e.g. 300k or 1M (rounded up to whole steps).
        steps: optimizer steps instead of --tokens (0: use --tokens).
        lora: LoRA rank (0: full finetuning); feature maps train too; adapters are merged into the saved model.
        lora_modules: comma-separated module names to adapt (default: the attention's q/k/v/o projections).
        kd: weight of KL(teacher || student) on next-token distributions, added to the LM loss (0: off).
        teacher: teacher model for --kd (HF directory, GGUF file); default: the student's own original model.
        out: run directory: metrics.jsonl, checkpoint/, then the final model.
        lr: peak learning rate of AdamW (default: 2e-4 with LoRA, 3e-5 for full finetuning).
        batch_size: blocks per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        warmup: warmup steps (a fraction of all steps if < 1).
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        block_size: tokens per block; unset: the prepared folder's, else 512.
        eval_every: evaluate on held-out blocks every this many steps (0: only before and after).
        eval_blocks: held-out blocks per evaluation.
        checkpoint_every: write a checkpoint every this many steps (0: only on Ctrl-C).
        seed: seed of the data order, LoRA's initial weights and the RNG.
        resume: continue the interrupted run in --out from its last checkpoint.
        overwrite: delete an earlier run in --out and start again.
        progress: show a progress bar on stderr.
        json: print the result as JSON.
    """
    if lora < 0:
        raise T2RError(f"--lora is a LoRA rank >= 0 (0: full finetuning), got {lora}")
    if teacher is not None and not kd:
        raise T2RError("--teacher is used only for distillation: add --kd WEIGHT (e.g. --kd 1)")
    config = TrainConfig(lr=lr or DEFAULT_LR["lora" if lora else "full"], **budget(tokens, steps),
                         batch_size=batch_size, grad_accum=grad_accum, warmup=warmup, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, eval_every=eval_every, eval_blocks=eval_blocks,
                         checkpoint_every=checkpoint_every, seed=seed, progress=progress)
    check_run_dir(Path(out), resume=resume, overwrite=overwrite)  # before minutes of loading
    student, tokenizer = load_student(model)
    teacher_model = None
    if teacher is not None:
        teacher_model, teacher_tokenizer = load_student(teacher)
        check_same_tokenizer(tokenizer, teacher_tokenizer, teacher)
    blocks = load_training_data(data, tokenizer, block_size)
    started = time.perf_counter()
    settings = {"model": str(Path(model).resolve()) if Path(model).exists() else model, "data": data,
                "teacher": teacher}
    summary = finetune_model(student, blocks, out, config, tokenizer=tokenizer, lora=lora, lora_modules=lora_modules,
                             kd=kd, teacher=teacher_model, settings=settings, resume=resume, overwrite=overwrite)
    return {"model": model, "data": data, "stage": "finetune", "lora": lora, "kd": kd, **summary,
            "wall_seconds": round(time.perf_counter() - started, 2)}


def pipeline(*, config: str, out: str | None = None, json: bool = False) -> dict:
    """Run a recipe end to end: convert, attention transfer, softmax layers, finetune, evaluate, export, report.

    Args:
        config: YAML recipe file, or the name of a shipped one: t2r-paper, random-init-baseline, t2r-transfer, hedgehog-transfer, hybrid-window-auto, demo.
        out: run directory (default: runs/<recipe name>); rerunning skips finished stages and resumes the rest.
        json: print the results as JSON.
    """
    recipe = PipelineRecipe.from_file(config)
    return run_pipeline(recipe, out or f"runs/{recipe.name}")


def demo(*, out: str = "runs/demo", json: bool = False) -> dict:
    """A short pipeline on the embedded default model: convert (Hedgehog map + 64-token softmax window), a brief
    attention transfer on Jane Austen, then the teacher-vs-RNN perplexity table, text from both, decode speed and
    cache sizes. Rerunning reuses the finished stages in --out.

    Args:
        out: run directory.
        json: print the results as JSON.
    """

    return run_pipeline(PipelineRecipe.from_file("demo"), out)
